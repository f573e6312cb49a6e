"""dragexp's Hydra launcher plugin: one fresh process per job, each pinned to its own GPU."""
