"""Training: objectives, rollout lanes, the step and loop, checkpoints, streams, the pipeline of
stages."""
