"""Training: DeepSpeed config, schedules, the per-worker loop and the Ray Train driver."""
