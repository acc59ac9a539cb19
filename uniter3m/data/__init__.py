"""Run time data: LMDB stores, tokenisation, emotion lexicons, datasets, dialogue context, collate, sampler, packing,
prompts, labels, the synthetic demo corpus."""
