"""`LRAgentHiRadixCache` without a server: SGLang's real host pool and HiCacheController
on CPU pools, driven as SGLang's scheduler drives them (insert, evict, match with a host
hit, `init_load_back`, `ready_to_load_host_cache`, `check_hicache_events`), for each
write policy. The KV a request wrote must come back from host memory unchanged, into the
slots its next match reuses, with its LR rows still there; nothing may leak."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache import pool_host
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, MatchPrefixParams
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.radix_cache import RadixKey
from test_server_units import KV_SLOTS, PROMPT, FakeReq, Scheduler

from lragent_sglang.scheme import Scheme
from lragent_sglang.server import cpu_hicache
from lragent_sglang.server.hicache import LRAgentHiRadixCache


@pytest.fixture(autouse=True)
def cpu_host_pool(monkeypatch):
    """The CPU rows of our patch table (`patches.cpu_patches`), for this process only."""
    monkeypatch.setattr(pool_host.common, "_cuda_host_register", lambda buffer: None)
    monkeypatch.setattr(MHATokenToKVPoolHost, "load_to_device_per_layer",
                        lambda self, *a: cpu_hicache.load_to_device_per_layer(None, self, *a))
    monkeypatch.setattr(MHATokenToKVPoolHost, "backup_from_device_all_layer",
                        lambda self, *a: cpu_hicache.backup_from_device_all_layer(None, self, *a))


class HostScheduler(Scheduler):
    """The unit-test scheduler of test_server_units with the host tier's cache."""

    def __init__(self, policy: str, layout: str = "page_first") -> None:
        super().__init__(Scheme.BASE_LR_SHARED)
        server_args = SimpleNamespace(hicache_ratio=2.0, hicache_size=0, hicache_mem_layout=layout,
                                      hicache_storage_backend=None, hicache_write_policy=policy,
                                      hicache_io_backend="kernel")
        params = SimpleNamespace(disable=False, req_to_token_pool=self.rows, token_to_kv_pool_allocator=self.allocator,
                                 page_size=1, eviction_policy="lru", enable_metrics=False, tp_cache_group=None,
                                 attn_cp_cache_group=None, attn_tp_cache_group=None, pp_cache_group=None)
        self.cache = LRAgentHiRadixCache(params, self.rt, server_args)

    def write_kv(self, req: FakeReq) -> torch.Tensor:
        """Give every token of the request's new slots its own K and V (its token id)."""
        slots = self.rows.req_to_token[req.req_pool_idx, : len(req.origin_input_ids)].to(torch.int64)
        ids = torch.tensor(req.origin_input_ids, dtype=torch.float32)[:, None, None]
        for layer in range(self.kv.layer_num):
            self.kv.k_buffer[layer][slots] = ids + layer
            self.kv.v_buffer[layer][slots] = -ids - layer
        return slots

    def kv_of(self, slots: torch.Tensor) -> list[torch.Tensor]:
        return [torch.cat([self.kv.k_buffer[i][slots], self.kv.v_buffer[i][slots]]) for i in range(self.kv.layer_num)]


def load_back(s: HostScheduler, tokens: list[int]) -> FakeReq:
    """Match with a host hit and load it back as the prefill adder does."""
    s.n += 1
    req = FakeReq(f"r{s.n}", list(tokens), "a")
    m = s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), None), req=req))
    req.prefix_indices, req.last_node = m.device_indices, m.last_device_node
    assert m.host_hit_length > 0
    new, req.last_node = s.cache.init_load_back(InitLoadBackParams(best_match_node=m.best_match_node,
                                                                   host_hit_length=m.host_hit_length, req=req))
    req.prefix_indices = torch.cat([req.prefix_indices, new])
    req.cache_protected_len = len(req.prefix_indices)
    s.cache.inc_lock_ref(req.last_node)
    assert s.cache.ready_to_load_host_cache() >= 0, "a load was queued"
    return req


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_evicted_trajectory_comes_back_from_host_memory_unchanged(policy, layout):
    s = HostScheduler(policy, layout)
    first = s.prefill(PROMPT, "a")
    kv_before = s.kv_of(s.write_kv(first))
    s.finish(first)
    s.cache.check_hicache_events()
    assert not s.cache.ongoing_write_through, "write-through copies are done and unlocked"
    written = s.cache.stats()["host"]["written_tokens"]
    assert written == (len(PROMPT) if policy == "write_through" else 0)
    assert s.cache.evict(EvictParams(num_tokens=KV_SLOTS)).num_tokens_evicted == len(PROMPT)
    assert s.allocator.available_size() == KV_SLOTS, "the device slots are free"
    stats = s.cache.stats()
    assert stats["host"]["tokens"] == len(PROMPT) and stats["lr"]["tokens"] == len(PROMPT), "LR rows stay"

    again = load_back(s, PROMPT + [7, 8])
    assert len(again.prefix_indices) == len(PROMPT), "the loaded tokens extend the prefix"
    assert again.lragent.gap is None and len(again.lragent.lr_prefix) == len(PROMPT)
    for before, after in zip(kv_before, s.kv_of(again.prefix_indices)):
        assert torch.equal(before, after)
    s.cache.check_hicache_events()
    assert not s.cache.ongoing_load_back
    s.extend(again)
    s.finish(again)
    s.assert_no_leak()
    assert s.cache.stats()["host"]["loaded_back_tokens"] == len(PROMPT)
    s.cache.reset()
    assert s.cache.token_to_kv_pool_host.available_size() == s.cache.token_to_kv_pool_host.size


def test_selective_write_through_backs_up_on_the_second_hit_only():
    s = HostScheduler("write_through_selective")
    s.finish(s.prefill(PROMPT, "a"))
    s.cache.check_hicache_events()
    assert s.cache.stats()["host"]["written_tokens"] == 0
    s.finish(s.prefill(PROMPT + [5], "a"))
    s.cache.check_hicache_events()
    assert s.cache.stats()["host"]["written_tokens"] == len(PROMPT)
    s.assert_no_leak()


def test_host_pool_full_drops_host_only_leaves_lru_first():
    s = HostScheduler("write_back")
    host = s.cache.token_to_kv_pool_host
    per = 24
    fill = [list(range(1000 * i, 1000 * i + per)) for i in range(host.size // per + 2)]
    for tokens in fill:
        s.finish(s.prefill(tokens, "a"))
        s.cache.evict(EvictParams(num_tokens=KV_SLOTS))
        s.assert_no_leak()
    assert host.available_size() < per and s.cache.stats()["host"]["evicted_tokens"] > 0
    m = s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", fill[0]), None), req=None))
    assert m.host_hit_length == 0, "the oldest trajectory left host memory first"
    m = s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", fill[-1]), None), req=None))
    assert m.host_hit_length == per
