"""The soak script (issue 17): a short soak of base-lr-shared on the real CPU server with
every kind of traffic it mixes in (bad requests, clients leaving, the adapter reload under
the same name) passes all its checks; a refusal that arrives as SGLang's error event in a
stream counts with its own status."""

from __future__ import annotations

import json

import pytest
import soak

from lragent_sglang.adapters.make import make_role_adapters


class StreamedRefusal:
    """A 200 stream whose first event is SGLang's error event (a 400 after the stream began)."""

    status_code = 200

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def iter_lines(self):
        yield b'data: {"error": {"message": "lora_path \'spare\' is not a loaded adapter", "code": 400}}'
        yield b"data: [DONE]"


def test_streamed_error_event_counts_with_its_status(monkeypatch) -> None:
    monkeypatch.setattr(soak.requests, "post", lambda *a, **k: StreamedRefusal())
    assert soak.generate("http://x", [1, 2], "spare", 4, stream=True) == (400, [], 0)


@pytest.mark.e2e
@pytest.mark.slow
def test_short_soak_passes_every_check(smollm2, tmp_path, capsys) -> None:
    adapters = make_role_adapters(smollm2, tmp_path / "roles", shared_v_a=True)
    out = tmp_path / "soak.json"
    rc = soak.main(["--model-path", str(smollm2), "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
                    "--schemes", "base-lr-shared", "--duration", "25", "--concurrency", "3",
                    "--context", "64", "400", "--churn-period", "6", "--bad-share", "0.15",
                    "--leave-share", "0.15", "--vocab", "49152", "--out", str(out),
                    "--", "--dtype", "float32", "--max-total-tokens", "8192"])
    result = json.loads(out.read_text())["results"][0]
    assert rc == 0, (capsys.readouterr().out, result)
    assert result["failures"] == [] and result["pools"]["whole"] and result["reload_equal"]
    assert result["probes_equal"] == result["probes"] == 12
    assert result["requests"] > 0 and result["reloads"] >= 2
    assert result["bad"] == result["bad_4xx"] > 0 and result["left"] > 0
