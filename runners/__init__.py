"""One module per mode (train, memory, speed, report); each has ``run(cfg, env) -> dict`` of record fields."""
