"""The generation side of `generation.weight_sync: broadcast`, as a vLLM weight-transfer engine.

vLLM's own broadcast engine (`nccl`) is built on its CUDA-only NCCL communicator, so it
cannot run on a CPU. This engine does the same over a torch process group (gloo on CPU,
NCCL on GPU; hh_ray.weights), through the same API: registered in vLLM's
`WeightTransferEngineFactory` as `hh_broadcast` (the `vllm.general_plugins` entry point
registers it in every vLLM process, tensor-parallel workers included), built by the engine
from `weight_transfer_config`, driven by `init_weight_transfer_engine` / `start_weight_update`
/ `update_weights` / `finish_weight_update`. Weights load through vLLM's layer-wise reload,
as the object-store path's `reload_weights` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hh_ray.weights import join_group, receive_weights, rendezvous

BACKEND = "hh_broadcast"


def register() -> None:
    """Register the engine with vLLM (idempotent; the `vllm.general_plugins` entry point)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, _engine_class())


@dataclass
class BroadcastInitInfo:
    host: str
    port: int
    rank_offset: int     # this engine's first rank; its tensor-parallel ranks follow
    world_size: int
    backend: str         # 'gloo' or 'nccl'
    timeout_s: float = 300.0


@dataclass
class BroadcastUpdateInfo:
    specs: list = field(default_factory=list)      # [[name, dtype, shape], ...] (hh_ray.weights.tensor_specs)
    aliases: dict = field(default_factory=dict)
    bucket_bytes: int = 64 << 20


def _engine_class():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    class BroadcastWeightTransferEngine(WeightTransferEngine[BroadcastInitInfo, BroadcastUpdateInfo]):
        init_info_cls = BroadcastInitInfo
        update_info_cls = BroadcastUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.group, self.store, self.backend = None, None, "gloo"

        def init_transfer_engine(self, info: BroadcastInitInfo) -> None:
            self.shutdown()  # a rebuilt group (a generator revived, a learner restarted) replaces the old one
            rank = info.rank_offset + self.parallel_config.rank
            self.store = rendezvous(info.host, info.port, info.world_size, False, info.timeout_s)
            self.group = join_group(self.store, rank, info.world_size, info.backend, info.timeout_s)
            self.backend = info.backend

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict) -> None:
            # The base class ends with torch.accelerator.synchronize(), which a CPU has not.
            self.receive_weights(self.parse_update_info(update_info))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        def receive_weights(self, info: BroadcastUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("weight broadcast: no process group; init_weight_transfer_engine first")
            device = self.device if self.backend == "nccl" else torch.device("cpu")
            self.model.load_weights(receive_weights(self.group, info.specs, info.aliases, info.bucket_bytes, device))

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def shutdown(self) -> None:
            self.group, self.store = None, None

    return BroadcastWeightTransferEngine
