"""The torch trainer: advantages, the decoupled PPO loss, batches and packing, the actor (one
process, or FSDP2 ranks), chunked logprobs, activation recompute, weight export and checkpoint
tensors. Only `commands/` and the trainer itself import it."""
