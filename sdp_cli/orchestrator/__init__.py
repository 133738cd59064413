"""The run's orchestration: the training loop, the weight-update sequence's place in it,
evaluation, samples, the run's start event and where a run stands. No torch here, not even
transitively: the loop drives the trainer through `loop.Trainer`, and `sdp simulate` runs the same
parts without one."""
