"""scripts/loadtest.py: SSE timing, percentiles, reports, target refusal, the generated
image, and one short real run through nginx to an engine stand-in on loopback.

The pure parts are checked against values computed by hand here (and numpy for the
percentile method); the run is judged by what the gateway's access log and the stand-in's
timing say, not by the tool's own report alone.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import zlib
from dataclasses import replace
from pathlib import Path

import numpy
import pytest
from PIL import Image

from scripts import loadtest as lt
from scripts.bench import (
    FIGURES,
    VICTIM,
    BenchOptions,
    RunResult,
    Topology,
    failover_counts,
)
from scripts.bench import options as bench_options
from scripts.bench import parser as bench_parser
from scripts.rehearsal import netns
from tests.support.loadtest import outputs


def chunk(content: str | None = None, **extra: object) -> bytes:
    delta = {"content": content} if content is not None else {"role": "assistant", "content": ""}
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}], **extra}).encode()


def test_sse_events_are_timed_by_the_piece_that_completes_them() -> None:
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n'
    pieces = [
        (0.010, chunk() + b"\n\n"),
        (0.050, chunk("Hel") + b"\n"),  # its blank line comes with the next piece
        (0.052, b"\n" + chunk("lo") + b"\n\n: a comment line\n\n"),
        (0.090, chunk(" world") + b"\r\n\r\n" + usage),
        (0.100, b"data: [DONE]\n\n"),
    ]
    parser = lt.SseParser()
    events = [e for t, piece in pieces for e in parser.feed(t, piece)]
    assert [e.t for e in events] == [0.010, 0.052, 0.052, 0.090, 0.090, 0.100]
    assert events[-1].data == "[DONE]"

    timing = lt.stream_timing(events)
    assert timing.first_chunk == 0.010  # the role chunk
    assert timing.first_token == 0.052  # "Hel", complete only at 0.052
    assert timing.inter_token == pytest.approx((0.0, 0.038))  # Hel->lo, lo->" world"
    assert timing.tokens == 3  # from usage, not the 3 text events (equal here by chance)
    assert timing.chunks == 5
    assert timing.done
    assert timing.malformed == 0


def test_sse_split_byte_by_byte_gives_the_same_events() -> None:
    stream = chunk() + b"\n\n" + chunk("a") + b"\n\n" + chunk("b") + b"\n\ndata: [DONE]\n\n"
    parser = lt.SseParser()
    events = [e for i in range(len(stream)) for e in parser.feed(float(i), stream[i : i + 1])]
    ends = [i for i in range(1, len(stream)) if stream[i - 1 : i + 1] == b"\n\n"]
    assert [e.t for e in events] == [float(i) for i in ends]
    timing = lt.stream_timing(events)
    assert timing.tokens == 2  # no usage chunk: the text events are counted
    assert timing.inter_token == (ends[2] - ends[1],)


def test_a_cut_stream_is_not_done_and_bad_json_is_counted() -> None:
    parser = lt.SseParser()
    events = parser.feed(0.1, chunk() + b"\n\ndata: {not json\n\n" + chunk("x") + b"\n\n")
    events += parser.feed(0.2, chunk("y") + b"\n")  # incomplete: never dispatched
    timing = lt.stream_timing(events)
    assert (timing.done, timing.malformed, timing.tokens, timing.chunks) == (False, 1, 1, 3)


def test_usage_of_a_non_streamed_reply() -> None:
    assert lt.completion_tokens(b'{"choices": [{}], "usage": {"completion_tokens": 7}}') == 7
    assert lt.completion_tokens(b'{"error": {"message": "x"}}') is None
    assert lt.completion_tokens(b"<html>") is None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # rank = (n - 1) * q / 100, interpolated between the neighbours:
        ([4.0, 1.0, 3.0, 2.0], (2.5, 3.85, 3.97)),  # ranks 1.5, 2.85, 2.97
        ([15.0, 20.0, 35.0, 40.0, 50.0], (35.0, 48.0, 49.6)),  # ranks 2, 3.8, 3.96
        ([7.0], (7.0, 7.0, 7.0)),
    ],
)
def test_percentiles_by_hand(values: list[float], expected: tuple[float, ...]) -> None:
    assert lt.percentiles(values) == pytest.approx(expected)


def test_percentiles_match_numpy_and_refuse_nonsense() -> None:
    rng = random.Random(7)
    values = [rng.expovariate(3.0) for _ in range(501)]
    for q in (0, 1, 50, 95, 99, 99.9, 100):
        assert lt.percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))
    assert lt.percentile([], 50) is None
    with pytest.raises(ValueError, match="outside"):
        lt.percentile([1.0], 101)


BASE_RECORD = lt.RequestRecord(
    phase="load",
    deployment="qwen3-vl-2b",
    model="qwen3-vl-2b",
    stream=True,
    session="",
    start=1000.0,
    status=200,
    outcome="ok",
    error="",
    request_id="r",
    first_chunk_s=0.01,
    ttft_s=0.1,
    e2e_s=1.0,
    output_tokens=10,
    chunks=11,
)


def record(**changes: object) -> lt.RequestRecord:
    return replace(BASE_RECORD, **changes)


def sample_records() -> list[lt.RequestRecord]:
    return [
        record(start=1000.0, ttft_s=0.1, e2e_s=1.0, inter_token_s=(0.02, 0.04)),
        record(start=1001.0, ttft_s=0.3, e2e_s=2.0, inter_token_s=(0.06,)),
        record(stream=False, ttft_s=None, first_chunk_s=None, e2e_s=0.5, output_tokens=20),
        record(stream=False, status=429, outcome="http_error", e2e_s=0.01, output_tokens=0),
        record(outcome="cut", e2e_s=0.4, output_tokens=0, ttft_s=0.05),
        record(status=0, outcome="transport_error", e2e_s=0.2, ttft_s=None, output_tokens=0),
        record(deployment="qwen3-vl-32b", model="big", stream=False, ttft_s=None, e2e_s=3.0),
    ]


def test_summary_per_model_and_mode() -> None:
    rows = {(s.model, s.mode): s for s in lt.summarize(sample_records(), window_s=10.0)}
    assert set(rows) == {
        ("qwen3-vl-2b", "stream"),
        ("qwen3-vl-2b", "non-stream"),
        ("qwen3-vl-2b", "all"),
        ("big", "non-stream"),  # one mode only: no `all` row
    }
    stream = rows[("qwen3-vl-2b", "stream")]
    assert (stream.requests, stream.ok, stream.errors) == (4, 2, 2)
    assert stream.error_ratio == 0.5
    assert dict(stream.errors_by_status) == {"cut": 1, "transport": 1}
    assert stream.requests_per_s == 0.4
    assert stream.ttft_s == pytest.approx((0.2, 0.29, 0.298))  # of the 2 OK streams only
    assert stream.itl_s == pytest.approx((0.04, 0.058, 0.0596))  # 0.02, 0.04, 0.06 pooled
    assert stream.e2e_s == pytest.approx((1.5, 1.95, 1.99))
    assert stream.output_tokens_per_s == 2.0  # 20 tokens of OK requests in 10 s
    plain = rows[("qwen3-vl-2b", "non-stream")]
    assert dict(plain.errors_by_status) == {"429": 1}
    assert plain.ttft_s == (None, None, None)
    both = rows[("qwen3-vl-2b", "all")]
    assert (both.requests, both.ok, both.output_tokens) == (6, 3, 40)


def test_summary_csv_and_table(tmp_path: Path) -> None:
    summaries = lt.summarize(sample_records(), window_s=10.0)
    lt.write_summary(tmp_path / "summary.csv", summaries)
    with (tmp_path / "summary.csv").open() as f:
        rows = {(r["model"], r["mode"]): r for r in csv.DictReader(f)}
    stream = rows[("qwen3-vl-2b", "stream")]
    assert stream["errors_by_status"] == "cut=1 transport=1"
    assert stream["error_ratio"] == "0.5000"
    assert stream["ttft_p50_s"] == "0.200000"
    assert stream["requests_per_s"] == "0.400"
    assert rows[("big", "non-stream")]["ttft_p99_s"] == ""

    table = lt.format_table(summaries).splitlines()
    assert table[0].split()[:4] == ["model", "mode", "requests", "req/s"]
    line = next(row for row in table if row.startswith("qwen3-vl-2b") and " stream " in row)
    assert line.split() == [
        "qwen3-vl-2b",
        "stream",
        "4",
        "0.4",
        "50.0%",
        "cut=1",
        "transport=1",
        "200/290/298",
        "40/58/60",
        "1500/1950/1990",
        "2.0",
    ]


def test_records_round_trip_through_csv(tmp_path: Path) -> None:
    records = sample_records()
    lt.write_records(tmp_path / "requests.csv", records)
    back = lt.read_records(tmp_path / "requests.csv")
    assert back == records


def test_timeline_buckets_by_completion() -> None:
    records = [
        record(start=100.0, e2e_s=0.5),  # ends at 100.5: bucket 0
        record(start=100.2, e2e_s=1.0),  # ends at 101.2: bucket 1
        record(start=100.3, e2e_s=1.2, outcome="cut", output_tokens=0),  # bucket 1, failed
    ]
    buckets = lt.timeline(records, origin=100.0, width=1.0)
    assert [b.requests_per_s for b in buckets] == [1.0, 2.0]
    assert [b.output_tokens_per_s for b in buckets] == [10.0, 10.0]
    assert buckets[1].e2e_s[0] == 1.0  # the failed one is not a latency sample
    assert lt.bucket_width(30) == 1.0
    assert lt.bucket_width(300) == 10.0


def test_cluster_target_from_stack_outputs() -> None:
    target = lt.cluster_target("prod", outputs(), None)
    assert (target.gateway_url, target.api_key_id, target.api_key) == (
        "http://gw.example.com",
        "loadtest",  # the key the stacks create for load tests
        "k-load",
    )
    routes = lt.gateway_routes(target, [])
    assert [(r.model, r.path) for r in routes] == [
        ("big", "/qwen3-vl-235b/v1/chat/completions"),
        ("qwen3-vl-2b", "/qwen3-vl-2b/v1/chat/completions"),
    ]
    assert lt.cluster_target("prod", outputs(), "default").api_key == "k-default"


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"gateway_url": None}, "no gateway_url"),
        ({"gateway_api_keys": "[secret]"}, "--show-secrets"),
        ({"stack": "dev"}, "not 'prod'"),
        ({"engines": {"qwen3-vl-2b": "qwen3-vl-2b"}}, "the engines output is not"),
    ],
)
def test_unusable_outputs_are_refused(given: dict[str, object], problem: str) -> None:
    with pytest.raises(lt.LoadtestError, match=problem):
        lt.cluster_target("prod", outputs() | given, None)


@pytest.mark.parametrize(
    "url",
    [
        "http://gw.example.com",
        "HTTP://GW.example.com:80/",
        "http://gw.example.com:80",
    ],
)
def test_the_stacks_own_gateway_is_accepted(url: str) -> None:
    target = lt.cluster_target("prod", outputs(), None)
    assert lt.check_url(target, url) == "http://gw.example.com:80"


@pytest.mark.parametrize(
    "url",
    [
        "http://other.example.com",
        "http://gw.example.com:8080",  # another port of the same host
        "https://gw.example.com",  # another scheme
        "http://gw.example.com.attacker.net",
        "http://127.0.0.1",
        "http://10.231.0.2:8080",
    ],
)
def test_any_other_target_is_refused(url: str) -> None:
    target = lt.cluster_target("prod", outputs(), None)
    with pytest.raises(lt.LoadtestError, match=r"refusing to load .*not the gateway of stack prod"):
        lt.check_url(target, url)


@pytest.mark.parametrize(
    "url", ["http://gw.example.com/v1", "http://user:pw@gw.example.com", "ftp://gw.example.com"]
)
def test_urls_with_more_than_an_origin_are_refused(url: str) -> None:
    with pytest.raises(lt.LoadtestError):
        lt.origin(url)


def test_a_rehearsal_address_is_never_loaded_as_a_cluster() -> None:
    target = lt.cluster_target("prod", outputs("http://10.231.0.2:8080"), None)
    assert lt.in_rehearsal_subnet(lt.check_url(target, None))
    assert not lt.in_rehearsal_subnet("http://10.20.0.5")  # a VPC address
    assert not lt.reaches_via_rehearsal("http://10.231.0.2:8080")  # this test's namespace


def write_inventory(state_dir: Path, stack: str = "dev") -> None:
    """The two files the rehearsal writes, in the shape scripts/rehearsal/plan.py gives them."""
    secrets_file = state_dir / "secrets.json"
    secrets_file.write_text(
        json.dumps({"client_api_keys": {"default": "a" * 40, "webui": "b" * 40}})
    )
    gateway_role = {
        "url": "http://127.0.0.1:8080",
        "port": 8080,
        "deployments": {"qwen3-vl-2b": "qwen3-vl-2b"},
    }
    inventory = {
        "version": 1,
        "target": "rehearsal",
        "stack": stack,
        "run": "dev",
        "secrets_file": str(secrets_file),
        "hosts": [
            {
                "name": "services",
                "netns": "qvr-dev-services",
                "address": "10.231.0.3",
                "roles": {"node": {}},
            },
            {
                "name": "gateway-0",
                "netns": "qvr-dev-gateway-0",
                "address": "10.231.0.2",
                "roles": {"node": {}, "gateway": gateway_role},
            },
        ],
    }
    (state_dir / "inventory.json").write_text(json.dumps(inventory))


def test_rehearsal_target_from_its_inventory(tmp_path: Path) -> None:
    write_inventory(tmp_path)
    target = lt.rehearsal_target(tmp_path, "dev", None)
    assert target.gateway_url == "http://10.231.0.2:8080"
    assert target.netns == "qvr-dev-gateway-0"  # the worker runs there, never in the root ns
    assert (target.api_key_id, target.api_key) == ("default", "a" * 40)  # no loadtest key
    assert dict(target.deployments) == {"qwen3-vl-2b": "qwen3-vl-2b"}
    argv = lt.worker_argv(Path("/x/spec.json"), target.netns)
    assert argv[:4] == ["ip", "netns", "exec", "qvr-dev-gateway-0"]
    with pytest.raises(lt.LoadtestError, match="refusing"):
        lt.check_url(target, "http://10.231.0.3:8080")


def test_rehearsal_of_another_stack_or_none_is_refused(tmp_path: Path) -> None:
    with pytest.raises(lt.LoadtestError, match="no running rehearsal"):
        lt.rehearsal_target(tmp_path, "dev", None)
    write_inventory(tmp_path, stack="staging")
    with pytest.raises(lt.LoadtestError, match="runs stack 'staging', not 'dev'"):
        lt.rehearsal_target(tmp_path, "dev", None)


def test_the_rehearsal_needs_root_and_ip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_inventory(tmp_path)
    monkeypatch.setattr(lt.shutil, "which", lambda _name: None)  # as without iproute2
    out = tmp_path / "out"
    assert lt.main(["--stack", "dev", "--state-dir", str(tmp_path), "--out", str(out)]) == 2
    assert "entering it (`ip netns exec`) needs root and iproute2's `ip`" in capsys.readouterr().err
    assert not out.exists()  # nothing started
    assert not (tmp_path / "worker-spec.json").exists()  # no key left on disk


@pytest.mark.parametrize("text", ["[]", "{not json", ""])
def test_an_unreadable_outputs_file_is_one_clean_message(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "outputs.json"
    saved.write_text(text)
    argv = ["--stack", "prod", "--target", "cluster", "--outputs-file", str(saved)]
    assert lt.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"loadtest: cannot read {saved}: ")


def test_caps_bound_every_run() -> None:
    phase = lt.PhaseSpec(
        name="load",
        base_url="http://h",
        api_key="k",
        routes=(lt.Route("d", "m", "/d/v1/chat/completions"),),
        users=1,
        spawn_rate=1.0,
        duration_s=1.0,
        max_requests=1,
        stream_ratio=0.5,
        image_ratio=1.0,
        image_size=(8, 8),
        image_variants=1,
    )
    for change in (
        {"users": lt.MAX_USERS + 1},
        {"duration_s": lt.MAX_DURATION_S + 1},
        {"max_requests": lt.MAX_REQUESTS + 1},
        {"stream_ratio": 1.5},
    ):
        with pytest.raises(lt.LoadtestError):
            replace(phase, **change)
    spec = lt.WorkerSpec(phases=(phase,), records_csv="r", meta_json="m")
    assert lt.WorkerSpec.from_json(spec.to_json()) == spec
    with pytest.raises(lt.LoadtestError, match="progress interval 0 s must be > 0"):
        replace(spec, progress_interval_s=0.0)  # the worker divides by it
    assert spec.time_limit_s == 1.0 + 30.0 + lt.WORKER_OVERHEAD_S  # duration + grace + start


@pytest.mark.parametrize(("width", "height"), [(37, 21), (256, 256), (1, 1)])
def test_generated_image_is_a_valid_png_of_the_requested_size(width: int, height: int) -> None:
    png = lt.make_png(width, height, seed=3)
    with Image.open(io.BytesIO(png)) as image:
        image.load()  # decodes every pixel: fails on a bad CRC or truncated data
        assert (image.format, image.size, image.mode) == ("PNG", (width, height), "RGB")
    raw = zlib.decompress(png[png.index(b"IDAT") + 4 : png.index(b"IEND") - 8])
    assert len(raw) == height * (1 + 3 * width)  # one filter byte per scanline
    url = lt.png_data_url(png)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1], validate=True) == png
    assert lt.make_png(width, height, seed=4) != png or width * height == 1


def test_image_size_option() -> None:
    assert lt.parse_size("640x480") == (640, 480)
    for bad in ("640", "0x10", "axb", f"{lt.MAX_IMAGE_SIDE + 1}x1"):
        with pytest.raises(lt.LoadtestError, match="--image-size"):
            lt.parse_size(bad)


def test_bench_figures_carry_the_command_that_reproduces_them() -> None:
    assert BenchOptions().command(["affinity"]) == (
        ".venv/bin/python -m scripts.bench --only affinity"
    )
    opts = BenchOptions(rounds=2, round_s=3.0, image_size=(64, 64), affinity_s=4.0)
    command = opts.command(list(FIGURES))
    assert command == (
        ".venv/bin/python -m scripts.bench --rounds 2 --round-seconds 3 --image-size 64x64 "
        "--affinity-seconds 4"
    )
    # The printed command, parsed again, gives back the options that were measured.
    assert bench_options(bench_parser().parse_args(command.split()[3:])) == opts


def test_failover_counts_from_records_and_access_log() -> None:
    network = netns.plan_network(
        "bench", [(r, (r,)) for r in ("client", "gateway", "engine-0", "engine-1", "engine-2")]
    )
    topo = Topology(
        state=netns.State(path=Path("/nonexistent/state.json")),
        network=network,
        engines={},
        client_key="",
        engine_key="",
        access_log=Path("/nonexistent"),
        served_model="m",
        affinity_header="X-Session-Id",
        keys={},
    )
    victim, other = topo.address(VICTIM), topo.address("engine-0")
    kill = 100.0
    rows = [
        record(phase="failover", request_id="a", start=98.0, e2e_s=1.0),  # before
        record(
            phase="failover", request_id="b", start=99.5, e2e_s=0.6, outcome="cut"
        ),  # in flight, cut
        record(phase="failover", request_id="c", start=99.8, e2e_s=0.5),  # in flight, other engine
        record(phase="failover", request_id="d", start=100.5, e2e_s=0.3),  # after, retried
        record(
            phase="failover",
            request_id="e",
            start=101.0,
            e2e_s=0.3,
            status=502,
            outcome="http_error",
        ),
    ]
    access: dict[str, dict[str, object]] = {
        "a": {"upstream_addr": f"{victim}:8000"},
        "b": {"upstream_addr": f"{victim}:8000"},
        "c": {"upstream_addr": f"{other}:8000"},
        "d": {"upstream_addr": f"{victim}:8000, {other}:8000"},
        "e": {"upstream_addr": f"{victim}:8000"},
    }
    result = RunResult(
        records=rows, phases={"failover": (90.0, 110.0)}, access=access, kill_time=kill
    )
    counts = failover_counts(result, topo, kill)
    assert (counts.before, counts.in_flight, counts.after) == (1, 2, 2)
    assert (counts.failed_before_reply, counts.cut, counts.cut_on_victim) == (1, 1, 1)
    assert (counts.retried_elsewhere, counts.after_ok) == (1, 1)
