"""dejavu_py: fault-tolerant pipeline-parallel inference for Mixture-of-Experts models.

Package map: a folder is a process, over leaves that know no process (the layering contracts in
setup.cfg hold it).
  protocol/     leaf: what crosses between processes (step plans and results, sequence state, sampling
                parameters, routing records, recovery and replica messages, layout, store keys)
  models/       model math per family, loader, kernels, KV cache and attention metadata
  comm/         rendezvous store, edges, host rings, receiver threads, heartbeats, supervisor commands
  coordinator/  the coordinator process: requests, scheduling, output, journal, recovery
  stage/        a stage worker process: its loop, runner, decode graphs, sampler, swap, KV streaming,
                and its half of fault tolerance (replica sender and holder, checkpoints)
  runtime/      a rank's processes: supervisor, zygote, standby, launch; composes coordinator/ and stage/
"""

__version__ = "0.1.0"
