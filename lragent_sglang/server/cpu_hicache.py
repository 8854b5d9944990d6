"""SGLang's HiCache host pool on a machine without an accelerator.

`MHATokenToKVPoolHost` moves KV between device and host with sgl-kernel's transfer
kernels, which exist only for CUDA/ROCm (on CPU the names are never imported), and pins
its host buffer with `cudaHostRegister`, which needs a driver. On CPU the "device" pool
is host memory too, so a copy is a torch index copy per layer, through the host pool's
own per-layer views (`k_data_refs`, `v_data_refs`: layer_first and page_first layouts;
`hicache_check` refuses the others on CPU).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _on_cpu(device_pool: Any) -> bool:
    return device_pool.k_buffer[0].device.type == "cpu"


def load_to_device_per_layer(original: Callable, host_pool: Any, device_pool: Any, host_indices: torch.Tensor,
                             device_indices: torch.Tensor, layer_id: int, io_backend: str) -> None:
    """AROUND hook of `MHATokenToKVPoolHost.load_to_device_per_layer`."""
    if not _on_cpu(device_pool):
        return original(host_pool, device_pool, host_indices, device_indices, layer_id, io_backend)
    device_pool.k_buffer[layer_id][device_indices] = host_pool.k_data_refs[layer_id][host_indices]
    device_pool.v_buffer[layer_id][device_indices] = host_pool.v_data_refs[layer_id][host_indices]


def backup_from_device_all_layer(original: Callable, host_pool: Any, device_pool: Any, host_indices: torch.Tensor,
                                 device_indices: torch.Tensor, io_backend: str) -> None:
    """AROUND hook of `MHATokenToKVPoolHost.backup_from_device_all_layer`."""
    if not _on_cpu(device_pool):
        return original(host_pool, device_pool, host_indices, device_indices, io_backend)
    for layer in range(host_pool.layer_num):
        host_pool.k_data_refs[layer][host_indices] = device_pool.k_buffer[layer][device_indices]
        host_pool.v_data_refs[layer][host_indices] = device_pool.v_buffer[layer][device_indices]


def skip_host_register(original: Callable, buffer: torch.Tensor) -> None:
    """AROUND hook of `pool_host.common._cuda_host_register`: nothing to pin without a driver."""
