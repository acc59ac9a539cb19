"""Run time data: LMDB stores, tokenisation, datasets, dialogue context, collate, sampler, packing, prompts, labels, the synthetic demo corpus."""
