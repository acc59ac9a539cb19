"""Training (uniter3m.train): the engine, pretraining and fine-tuning runs, launchers, extract, predict."""
