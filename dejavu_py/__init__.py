"""dejavu_py: fault-tolerant pipeline-parallel inference for Mixture-of-Experts models.

Package map (the layout is the architecture):
  models/   model code for Hugging Face checkpoint layouts and the safetensors loader
  engine/   what is computed: requests, scheduler, KV cache, sampler, stage runner, coordinator
  comm/     how stages talk: the rendezvous store and one process group per pipeline edge
  runtime/  the processes: per-rank supervisor, zygote (fork template), stage worker
  ft/       fault tolerance: detection, replacement, KV replication, token-state checkpoints
"""

__version__ = "0.1.0"
