"""The SGLang-facing code without a server: our radix cache backend, the allocation hooks,
the LoRA split and the patch table, on SGLang's real CPU pools and a scripted scheduler
(in the manner of SGLang's `RadixCache.create_simulated`). Seconds, not minutes.
"""

from __future__ import annotations

import pkgutil
from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from lragent_sglang.scheme import LRBasis, Scheme
from lragent_sglang.server import lora_split, patches
from lragent_sglang.server.allocation import alloc_decode_lr, fix_extend_alloc
from lragent_sglang.server.cache import LRAgentRadixCache, LRPoolExhausted
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.lr_pool import LRTokenPool
from lragent_sglang.server.request import RequestState, init_request
from lragent_sglang.server.runtime import SHARED_LR_KEY, LRAgentRuntime

KV_SLOTS = 64
MAX_CONTEXT = 32


@dataclass(eq=False)
class FakeReq:
    """The fields of SGLang's `Req` that the cache and the hooks read and write."""

    rid: str
    origin_input_ids: list[int]
    lora_id: str | None
    extra_key: str | None = None
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    last_node: object = None
    prefix_indices: torch.Tensor | None = None
    cache_protected_len: int = 0
    lragent: RequestState = field(default_factory=RequestState)

    def get_fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids


class Scheduler:
    """What SGLang's scheduler does around our cache for one request at a time: match,
    lock, allocate (stock `alloc_for_extend` under our hook), finish."""

    def __init__(self, scheme: Scheme, lr_slots: int | None = None) -> None:
        self.kv = MHATokenToKVPool(KV_SLOTS, page_size=1, dtype=torch.float32, head_num=1, head_dim=4,
                                   layer_num=2, device="cpu", enable_memory_saver=False)
        self.allocator = TokenToKVPoolAllocator(KV_SLOTS, torch.float32, "cpu", self.kv, need_sort=False)
        self.rows = ReqToTokenPool(8, MAX_CONTEXT, "cpu", False)
        self.rt = LRAgentRuntime(LRAgentConfig(scheme))
        self.rt.bound = self.rt.enabled = True
        self.rt.width = 4
        if scheme.one_lr_cache:  # as --lora-paths adapters found the group at start-up
            self.rt.group = lora_split.shared_a_group("a", {0: torch.ones(4, 8), 1: torch.ones(4, 8)})
        self.rt.lr_pool = LRTokenPool(lr_slots or 2 * KV_SLOTS, 4, 2, torch.float32, "cpu",
                                      max_reqs=9, max_context_len=MAX_CONTEXT)
        params = SimpleNamespace(disable=False, req_to_token_pool=self.rows, token_to_kv_pool_allocator=self.allocator,
                                 page_size=1, eviction_policy="lru", enable_metrics=False)
        self.cache = LRAgentRadixCache(params, self.rt)
        self.free_rows = list(range(1, 9))
        self.n = 0

    def match(self, tokens: list[int], lora_id: str | None, extra_key: str | None = None,
              req: FakeReq | None = None) -> FakeReq:
        """SGLang's scheduling match (init_next_round_input), which caps the key."""
        if req is None:
            self.n += 1
            req = FakeReq(f"r{self.n}", list(tokens), lora_id, extra_key)
        key = RadixKey(array("q", tokens), extra_key, limit=len(tokens))
        m = self.cache.match_prefix(MatchPrefixParams(key=key, req=req))
        req.prefix_indices, req.last_node = m.device_indices, m.last_device_node
        req.cache_protected_len = len(m.device_indices)
        self.cache.inc_lock_ref(req.last_node)
        return req

    def stock_alloc_for_extend(self, batch: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.allocator.alloc(sum(batch.extend_lens))
        rows = []
        offset = 0
        for req, prefix, ext in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            req.req_pool_idx = self.free_rows.pop(0)
            rows.append(req.req_pool_idx)
            table = self.rows.req_to_token[req.req_pool_idx]
            table[:prefix] = req.prefix_indices.to(table.dtype)
            table[prefix : prefix + ext] = out[offset : offset + ext].to(table.dtype)
            offset += ext
        rpi = torch.tensor(rows, dtype=torch.int64)
        return out, rpi, rpi

    def extend(self, *reqs: FakeReq) -> torch.Tensor:
        """One extend batch through our `alloc_for_extend` hook; its `out_cache_loc`."""
        batch = SimpleNamespace(reqs=list(reqs), prefix_lens=[len(r.prefix_indices) for r in reqs],
                                extend_lens=[len(r.origin_input_ids) - len(r.prefix_indices) for r in reqs],
                                tree_cache=self.cache, req_to_token_pool=self.rows)
        return fix_extend_alloc(self.stock_alloc_for_extend, batch)[0]

    def prefill(self, tokens: list[int], lora_id: str | None, extra_key: str | None = None) -> FakeReq:
        req = self.match(tokens, lora_id, extra_key)
        self.extend(req)
        return req

    def finish(self, req: FakeReq) -> None:
        self.cache.cache_finished_req(req, kv_len_to_handle=len(req.get_fill_ids()))
        self.free_rows.append(req.req_pool_idx)

    def held(self) -> tuple[int, int]:
        """(KV slots, LR rows) in use outside the free lists: what the tree must account for."""
        return (KV_SLOTS - self.allocator.available_size(),
                self.rt.lr_pool.size - self.rt.lr_pool.available_size())

    def assert_no_leak(self) -> None:
        assert self.held() == (self.cache.total_size(), self.cache.tree.lr_total_size())
        self.cache.tree.sanity_check()


PROMPT = list(range(100, 110))


def test_base_shared_second_adapter_gets_the_base_gap_and_reprefills_its_lr():
    s = Scheduler(Scheme.BASE_SHARED)
    a = s.prefill(PROMPT, "a")
    base_slots = s.rows.req_to_token[a.req_pool_idx, :10].clone()
    s.finish(a)
    s.assert_no_leak()
    free_before = s.allocator.available_size()

    b = s.match(PROMPT + [7, 8, 9, 10], "b")
    assert len(b.prefix_indices) == 0, "no LR of b is cached: SGLang must forward everything"
    assert torch.equal(b.lragent.gap, base_slots.to(b.lragent.gap.dtype))
    out = s.extend(b)
    assert torch.equal(s.rows.req_to_token[b.req_pool_idx, :10], base_slots), "the gap reuses the cached base"
    assert out[:10].eq(0).all() and out[10:].ne(0).all(), "gap tokens write K/V to the padding slot"
    assert s.allocator.available_size() == free_before - 4, "only the 4 new tokens took fresh KV slots"
    assert s.rt.take_gap([b.rid]) and not s.rt.take_gap([b.rid])
    lr_rows = s.rt.lr_pool.req_to_lr[b.req_pool_idx, :14]
    assert lr_rows.ne(0).all() and len(set(lr_rows.tolist())) == 14, "fresh LR rows for all 14 tokens"
    s.finish(b)
    s.assert_no_leak()
    assert s.cache.tree.lr_total_size("a") == 10 and s.cache.tree.lr_total_size("b") == 14
    counts = s.cache.stats()["per_adapter"]["b"]
    assert (counts["base_hit_tokens"], counts["lr_hit_tokens"], counts["lr_reprefill_tokens"],
            counts["computed_tokens"]) == (10, 0, 10, 14)


def test_stats_count_the_scheduling_match_not_the_priority_pass():
    """A cache-aware policy (lpm) matches the whole prompt first, uncapped; SGLang then
    reuses at most len - 1 tokens. The dashboards count what is reused."""
    s = Scheduler(Scheme.BASE_SHARED)
    s.finish(s.prefill(PROMPT, "a"))
    req = FakeReq("lpm", list(PROMPT), "a", None)
    s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", PROMPT)), req=req))
    s.match(PROMPT[:-1], "a", req=req)
    counts = s.cache.stats()["per_adapter"]["a"]
    assert (counts["requests"], counts["base_hit_tokens"], counts["lr_hit_tokens"]) == (2, 9, 9)


def test_stats_report_no_host_tier_without_one():
    """The dashboard draws a host-tier panel from `host`; zeros would claim a tier that does nothing."""
    s = Scheduler(Scheme.BASE_SHARED)
    s.finish(s.prefill(PROMPT, "a"))
    assert "host" not in s.cache.stats()


def test_base_lr_shared_second_adapter_hits_the_shared_lr():
    s = Scheduler(Scheme.BASE_LR_SHARED)
    s.finish(s.prefill(PROMPT, "a"))
    b = s.match(PROMPT + [7, 8], "b")
    assert len(b.prefix_indices) == 10 and b.lragent.gap is None
    assert b.last_node.lr_key == f"{SHARED_LR_KEY}:{s.rt.group.digest}"
    s.extend(b)
    assert s.rt.lr_pool.req_to_lr[b.req_pool_idx, :10].ne(0).all(), "the shared LR prefix is handed over"
    assert b.lragent.lr_protected == 10
    s.finish(b)
    s.assert_no_leak()
    assert s.cache.tree.lr_total_size(b.last_node.lr_key) == 12


def test_concurrent_duplicates_are_freed_first_writer_wins():
    s = Scheduler(Scheme.BASE_SHARED)
    a, b = s.match(PROMPT, "a"), s.match(PROMPT, "a")
    s.extend(a, b)
    first = s.rows.req_to_token[a.req_pool_idx, :10].clone()
    s.finish(a)
    s.finish(b)
    s.assert_no_leak()
    assert s.cache.total_size() == 10 and s.cache.tree.lr_total_size("a") == 10
    assert torch.equal(s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", PROMPT)))).device_indices,
                       first.to(torch.int64))


def test_locked_prefix_survives_eviction_and_unlocked_is_freed():
    s = Scheduler(Scheme.BASE_SHARED)
    s.finish(s.prefill(PROMPT, "a"))
    running = s.prefill(list(range(200, 208)), "a")
    evicted = s.cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted
    assert evicted == 10, "only the finished, unlocked request's tokens"
    assert s.cache.protected_size() == 0 and s.cache.evictable_size() == 0
    s.finish(running)
    assert s.cache.evictable_size() == 8
    s.assert_no_leak()
    assert s.rt.lr_pool.available_size() == s.rt.lr_pool.size - 8, "evicted base pages took their LR rows along"


def test_alloc_lr_evicts_lr_pages_then_refuses_naming_the_pool():
    s = Scheduler(Scheme.BASE_SHARED, lr_slots=20)
    s.finish(s.prefill(PROMPT, "a"))  # 10 LR rows held by the tree, unlocked
    slots = s.cache.alloc_lr(15)
    assert len(slots) == 15 and s.cache.tree.lr_total_size() == 0, "the cached LR rows made room"
    with pytest.raises(LRPoolExhausted, match="need 8 slots, 5 free of 20"):
        s.cache.alloc_lr(8)


def test_salted_requests_share_within_their_salt_only():
    """cache_salt is a namespace of the tree: base and LR pages are shared by the requests
    of one salt and by nobody else (issue 17)."""
    s = Scheduler(Scheme.BASE_LR_SHARED)
    s.finish(s.prefill(PROMPT, "a"))
    first = s.prefill(PROMPT, "b", extra_key="tenant-1")
    assert len(first.prefix_indices) == 0 and first.lragent.gap is None, "nothing from the unsalted request"
    s.finish(first)
    again, other = s.prefill(PROMPT, "a", extra_key="tenant-1"), s.prefill(PROMPT, "a", extra_key="tenant-2")
    assert len(again.prefix_indices) == 10 and again.lragent.lr_protected == 10, "the same salt hits base and LR"
    assert len(other.prefix_indices) == 0, "another salt does not"
    s.finish(again)
    s.finish(other)
    s.assert_no_leak()
    assert s.cache.total_size() == 30 and s.cache.tree.lr_total_size() == 30


def test_chunked_prefill_caches_the_chunk_and_moves_the_lock():
    s = Scheduler(Scheme.BASE_SHARED)
    req = s.match(PROMPT, "a")
    s.extend(req)
    req.origin_input_ids = PROMPT[:6]  # the first chunk as get_fill_ids() sees it
    s.cache.cache_unfinished_req(req)
    assert s.cache.total_size() == 6 and s.cache.protected_size() == 6
    assert req.cache_protected_len == 6 and req.lragent.lr_protected == 6
    req.origin_input_ids = PROMPT
    s.finish(req)
    s.assert_no_leak()
    assert s.cache.protected_size() == 0 and s.cache.tree.lr_total_size("a") == 10


def test_decode_gets_one_lr_row_per_request_with_an_lr_key():
    s = Scheduler(Scheme.BASE_SHARED)
    with_lr, without = s.prefill(PROMPT, "a"), s.prefill([300, 301], None)
    batch = SimpleNamespace(tree_cache=s.cache, reqs=[with_lr, without],
                            seq_lens=torch.tensor([10, 2]),
                            req_pool_indices=torch.tensor([with_lr.req_pool_idx, without.req_pool_idx]))
    free = s.rt.lr_pool.available_size()
    alloc_decode_lr(None, batch)
    assert s.rt.lr_pool.available_size() == free - 1
    assert s.rt.lr_pool.req_to_lr[with_lr.req_pool_idx, 10] != 0
    assert s.rt.lr_pool.req_to_lr[without.req_pool_idx, 2] == 0


# ---- the LoRA split -----------------------------------------------------------------

H_Q, H_KV, D, HIDDEN, R = 2, 1, 4, 6, 2


def fake_lora_pool(slots: int = 2) -> SimpleNamespace:
    q, kv = H_Q * D, H_KV * D
    return SimpleNamespace(
        A_buffer={"qkv_proj": [torch.randn(slots, 3 * R, HIDDEN)]},
        B_buffer={"qkv_proj": [torch.randn(slots, q + 2 * kv, R)]},
        base_hf_config=SimpleNamespace(num_attention_heads=H_Q, num_key_value_heads=H_KV, head_dim=D,
                                       hidden_size=HIDDEN),
        tp_size=1,
    )


def split_runtime(scheme: Scheme) -> tuple[LRAgentRuntime, SimpleNamespace]:
    rt = LRAgentRuntime(LRAgentConfig(scheme))
    rt.bound = rt.enabled = True
    rt.width = R
    pool = fake_lora_pool()
    rt.weights = lora_split.weight_stacks(rt, pool)
    rt.lr_pool = LRTokenPool(16, R, 1, torch.float32, "cpu", max_reqs=2, max_context_len=8)
    return rt, pool


def test_capture_moves_v_lora_out_of_the_qkv_buffer():
    rt, pool = split_runtime(Scheme.BASE_SHARED)
    a_v = pool.A_buffer["qkv_proj"][0][1, 2 * R:].clone()
    b_v = pool.B_buffer["qkv_proj"][0][1, H_Q * D + H_KV * D:].clone()  # [kv, R]
    q_b = pool.B_buffer["qkv_proj"][0][1, : H_Q * D].clone()
    adapter = SimpleNamespace(config=SimpleNamespace(r=R), scaling=0.5)
    lora_split.capture_v_weights(rt, None, pool, "uid-1", 1, adapter, [])
    assert rt.weights.slot_uid == {1: "uid-1"}
    assert torch.equal(rt.weights.a_v[0][1], a_v)
    expected_b = (0.5 * b_v).reshape(H_KV, D, R).transpose(1, 2)  # [H_kv, R, D]
    torch.testing.assert_close(rt.weights.b_v[0][1], expected_b)
    assert not pool.B_buffer["qkv_proj"][0][1, H_Q * D + H_KV * D:].any(), "stock QKV LoRA adds nothing to V"
    assert torch.equal(pool.B_buffer["qkv_proj"][0][1, : H_Q * D], q_b), "q keeps its LoRA"


def test_split_writes_each_tokens_lr_row_with_its_own_adapter():
    rt, pool = split_runtime(Scheme.BASE_SHARED)
    adapter = SimpleNamespace(config=SimpleNamespace(r=R), scaling=1.0)
    for slot in (0, 1):
        lora_split.capture_v_weights(rt, None, pool, f"uid-{slot}", slot, adapter, [])
    x = torch.randn(3, HIDDEN)
    rt.forward.token_slot = torch.tensor([1, 0, 1])
    rt.forward.lr_out_loc = torch.tensor([5, 6, 7])
    module = SimpleNamespace(lragent_layer_id=0)
    out = lora_split.split_qkv_lora(rt, lambda m, x: "qkv", module, x)
    assert out == "qkv"
    a = pool.A_buffer["qkv_proj"][0][:, 2 * R:]
    expected = torch.stack([x[0] @ a[1].T, x[1] @ a[0].T, x[2] @ a[1].T])
    torch.testing.assert_close(rt.lr_pool.lr_buffer[0][5:8], expected)
    assert not rt.lr_pool.lr_buffer[0][:5].any(), "nothing written elsewhere"


def test_base_lr_shared_writes_the_group_rows_for_every_token():
    rt, _ = split_runtime(Scheme.BASE_LR_SHARED)
    g = torch.randn(R, HIDDEN, dtype=torch.float64)
    lora_split.set_group(rt, lora_split.shared_a_group("plan", {0: g}))
    rt.forward.lr_out_loc = torch.tensor([1, 2])
    x = torch.randn(2, HIDDEN)
    lora_split.split_qkv_lora(rt, lambda m, x: None, SimpleNamespace(lragent_layer_id=0), x)
    torch.testing.assert_close(rt.lr_pool.lr_buffer[0][1:3], x @ g.float().T)


def fake_adapter(seed: int, scaling: float = 2.0) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    weights = {"self_attn.qkv_proj.lora_A.weight": torch.randn(3 * R, HIDDEN, generator=gen),
               "self_attn.qkv_proj.lora_B.weight": torch.randn(H_Q * D + 2 * H_KV * D, R, generator=gen)}
    return SimpleNamespace(scaling=scaling, config=SimpleNamespace(r=R), layers=[SimpleNamespace(weights=weights)])


def load(rt: LRAgentRuntime, uid: str, adapter: SimpleNamespace) -> None:
    manager = SimpleNamespace(loras={uid: adapter})
    lora_split.on_adapter_load(rt, lambda m, ref: None, manager, SimpleNamespace(lora_id=uid, lora_name=uid))


def test_base_shared_lr_keys_follow_adapter_content_not_name():
    """A name reloaded with other weights never reads the old LR rows; identical weights
    under another name read the same ones (issue 17)."""
    rt, _ = split_runtime(Scheme.BASE_SHARED)
    load(rt, "plan-v1", fake_adapter(1))
    load(rt, "plan-v2", fake_adapter(2))  # "plan" unloaded and loaded again with new weights
    load(rt, "copy", fake_adapter(1))
    load(rt, "rescaled", fake_adapter(1, scaling=3.0))
    keys = {uid: rt.lr_key(uid) for uid in ("plan-v1", "plan-v2", "copy", "rescaled")}
    assert keys["plan-v1"] == keys["copy"]
    assert len({keys["plan-v1"], keys["plan-v2"], keys["rescaled"]}) == 3
    assert rt.lr_key(None) is None
    names = rt.lr_key_names({"plan-v1": "plan", "copy": "copy", "plan-v2": "plan"})
    assert names[keys["copy"]] == "plan+copy" and names[keys["plan-v2"]] == "plan"


def test_start_up_adapters_get_content_keys_and_their_names(monkeypatch):
    """`--lora-paths` adapters load while SGLang builds the model runner, before our attach
    binds the runtime: they too are keyed by content, and the statistics name them."""
    from sglang.srt import server_args

    monkeypatch.setattr(server_args, "get_global_server_args", lambda: SimpleNamespace(
        attention_backend="lragent", radix_cache_backend="lragent", enable_lora=True, max_lora_rank=R,
        lora_paths=[]))
    rt = LRAgentRuntime(LRAgentConfig(Scheme.BASE_SHARED))
    load(rt, "uid-plan", fake_adapter(1))
    assert rt.bound and rt.lr_key("uid-plan").startswith("adapter:")
    assert rt.lr_key_names({"uid-plan": "plan", "uid-action": "action"}) == {
        rt.lr_key("uid-plan"): "plan", "uid-action": "action"}
    shared = LRAgentRuntime(LRAgentConfig(Scheme.BASE_LR_SHARED))
    load(shared, "uid-plan", fake_adapter(1))  # no pool yet: attach founds the group from --lora-paths
    assert shared.bound and shared.group is None


def test_base_lr_shared_key_is_the_group_basis_and_none_before_a_group():
    """Rows written before any adapter founded the group (A = 0: zeros) must not be read
    by the group's adapters later; rows of one basis never serve another."""
    rt, _ = split_runtime(Scheme.BASE_LR_SHARED)
    assert rt.lr_key(None) is None and rt.lr_key("plan") is None
    lora_split.set_group(rt, lora_split.shared_a_group("plan", {0: torch.randn(R, HIDDEN, dtype=torch.float64)}))
    first = rt.lr_key(None)
    assert first.startswith(SHARED_LR_KEY) and rt.lr_key("plan") == first
    assert rt.lr_key_names({}) == {first: SHARED_LR_KEY}
    lora_split.set_group(rt, lora_split.shared_a_group("other", {0: torch.randn(R, HIDDEN, dtype=torch.float64)}))
    assert rt.lr_key(None) != first


# ---- the patch table and the request hook -------------------------------------------


def test_every_patch_target_exists_in_this_sglang():
    rt = LRAgentRuntime(LRAgentConfig())
    for row in (*patches.sglang_patches(rt), *patches.cpu_patches()):
        assert callable(pkgutil.resolve_name(row.target)), row.target
        assert row.kind in ("before", "after", "around") and row.why


@pytest.mark.parametrize("scheme", list(Scheme))
def test_patch_rows_follow_the_scheme(scheme):
    rt = LRAgentRuntime(LRAgentConfig(scheme))
    targets = {p.target.rsplit(".", 2)[-2] + "." + p.target.rsplit(".", 1)[-1]
               for p in patches.sglang_patches(rt) if p.when(rt.config)}
    assert ("QKVParallelLinearWithLoRA.forward" in targets) == scheme.shares_base
    assert ("allocation.alloc_for_extend" in targets) == scheme.shares_base
    assert ("RadixCache.match_prefix" in targets) == (not scheme.shares_base)
    assert ("LoRAManager.load_lora_weights" in targets) == scheme.shares_base
    assert "Req.__init__" in targets and "Scheduler.get_internal_state" in targets


@pytest.mark.parametrize("scheme, stripped", [(Scheme.NON_SHARED, False), (Scheme.FULL_SHARED, True),
                                              (Scheme.BASE_SHARED, True), (Scheme.BASE_LR_SHARED, True)])
def test_request_hook_keys_by_tokens_where_the_scheme_shares(monkeypatch, scheme, stripped):
    from sglang.srt import server_args

    monkeypatch.setattr(server_args, "get_global_server_args",
                        lambda: SimpleNamespace(attention_backend="lragent", radix_cache_backend="lragent"))
    rt = LRAgentRuntime(LRAgentConfig(scheme, LRBasis.SHARED_A))
    req = SimpleNamespace(lora_id="id-7", extra_key="saltid-7")
    init_request(rt, None, req)
    assert req.lragent == RequestState()
    assert req.extra_key == ("salt" if stripped else "saltid-7")
