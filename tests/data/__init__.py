"""Run time data (uniter3m.data): stores, datasets, collate, context, sampler, packing, real loaders."""
