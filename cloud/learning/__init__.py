"""Learning: datasets, training, compression, evaluation, the promotion gate, the pipeline steps."""
