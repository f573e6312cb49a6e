"""What a run leaves behind: per-sample results, pictures, W&B, sweep summaries, paper plots."""
