"""L0-ARM network sparsification: data, models, training and tuning."""
