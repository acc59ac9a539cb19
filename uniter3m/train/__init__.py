"""Running: distributed backend, mixed precision, optimiser and schedule, checkpoints, run folders, the loop, and the
one assembly of datasets + model behind pretrain / finetune / evaluate / extract / probe / predict / demo."""
