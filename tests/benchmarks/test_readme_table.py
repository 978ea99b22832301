"""benchmarks/readme_table.py: a results file -> the README's benchmark table and plot.

The generator is checked on synthetic results: the exact markdown it prints, the peer it picks
(the faster HF variant, from the raw tokens/s, not from the line's own `peer` field) and the
ratio, that a later line of a row replaces an earlier one, that `--write` changes only the text
between the markers, that a missing marker is a one-line error, and that the plot is a PNG.
"""

import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _load_module():
    spec = importlib.util.spec_from_file_location("readme_table",
                                                  REPO / "benchmarks" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rt = _load_module()

ENC_MODEL = {"d_model": 512, "encoder_layers": 8, "decoder_layers": 8}
ENC_SHAPE = {"model": ENC_MODEL, "batch": 8, "input_length": 512, "target_length": 114}


def encdec_line(moetx_tps: float, date: str) -> dict:
    """T5.1.1-small enc-dec row where torch.compile (600 tok/s) beats eager (567)."""
    return {"benchmark": "encdec_train_throughput", "row": "encdec_adafactor",
            "run_all": {"mode": "side_by_side"}, **ENC_SHAPE,
            "optimizer": {"name": "adafactor"},
            "moetx_tokens_per_sec": moetx_tps, "moetx_mfu": 0.29, "moetx_first_step_s": 26.0,
            "moetx_peak_rss_mb": 3000.0,
            "hf_eager_tokens_per_sec": 567.0, "hf_eager_mfu": 0.44, "hf_eager_first_step_s": 11.0,
            "hf_eager_peak_rss_mb": 2500.0, "moetx_malloc_arena_max_8_peak_rss_mb": 2000.0,
            "hf_compile_tokens_per_sec": 600.0, "hf_compile_mfu": 0.466,
            "hf_compile_first_step_s": 95.0, "hf_compile_peak_rss_mb": 2800.0,
            "rss_baseline_mb": {"moetx": 1436.2, "hf_eager": 1435.9, "hf_compile": 1436.0},
            # A stale `peer` field: the generator must choose from the figures themselves.
            "peer": "hf_eager",
            "peak_flops_f32_matmul": 200e9, "peak_flops_bf16_matmul": 300e9,
            "background_cpu_cores": {"matmul": 0.01, "steps": 0.05}, "date": date}


LLAMA = {"benchmark": "train_throughput", "row": "decoder_llama_adamw",
         "run_all": {"mode": "side_by_side"}, "arch": "llama",
         "model": {"arch": "llama", "d_model": 512, "layers": 8}, "batch": 8, "length": 512,
         "optimizer": {"name": "adamw"},
         "moetx_tokens_per_sec": 1234.4, "moetx_mfu": 0.3, "moetx_first_step_s": 10.04,
         "hf_eager_tokens_per_sec": 98.76, "hf_eager_mfu": 0.024, "hf_eager_first_step_s": 2.0,
         "hf_compile_error": "InductorError: boom",
         "peak_flops_f32_matmul": 210e9, "peak_flops_bf16_matmul": 310e9,
         "background_cpu_cores": {"matmul": 0.0, "steps": 0.2},
         "date": "2026-12-05 10:30:00 UTC"}
DECODE = {"benchmark": "encdec_decode_throughput", "row": "encdec_adafactor",
          "run_all": {"mode": "side_by_side"}, **ENC_SHAPE,
          "moetx_generated_tokens_per_sec": 50.0, "hf_generated_tokens_per_sec": 25.0,
          "moetx_first_call_s": 3.0, "hf_first_call_s": 1.5,
          "moetx_peak_rss_mb": 1900.0, "hf_peak_rss_mb": 1600.0,
          "peak_flops_f32_matmul": 200e9, "peak_flops_bf16_matmul": 300e9,
          "background_cpu_cores": {"matmul": 0.01, "decode": 0.0},
          "date": "2026-12-05 10:05:00 UTC"}
FAILURE = {"benchmark": "run_all_failure", "row": "switch_adamw",
           "run_all": {"mode": "side_by_side"}, "returncode": 1,
           "date": "2026-12-05 11:00:00 UTC"}


def sweep_line(d_model: int, moetx_tps: float, eager_tps: float, compile_tps: float) -> dict:
    return {"benchmark": "train_throughput", "row": f"sweep_decoder_t5_d{d_model}",
            "run_all": {"mode": "sweep"}, "arch": "t5",
            "model": {"arch": "t5", "d_model": d_model, "layers": 8}, "batch": 8, "length": 512,
            "optimizer": {"name": "adafactor"},
            "moetx_tokens_per_sec": moetx_tps, "moetx_mfu": moetx_tps / 2000,
            "hf_eager_tokens_per_sec": eager_tps, "hf_eager_mfu": eager_tps / 2000,
            "hf_compile_tokens_per_sec": compile_tps, "hf_compile_mfu": compile_tps / 2000,
            "date": "2026-12-05 12:00:00 UTC"}


EXPECTED_TABLE = "\n".join([
    "| benchmark | optimizer | moetx | peer | moetx / peer | moetx / peer at the f32 peak "
    "| MFU moetx / peer | first step moetx / peer | peak RSS moetx / peer |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    "| T5.1.1 enc-dec (d 512, 8+8 layers, 8 × 512→114) | adafactor | 371 tok/s "
    "| HF torch.compile: 600 tok/s | 0.62× | 2.15× | 29.0% / 46.6% | 26.0 / 95.0 s "
    "| 3,000 / 2,800 MiB |",
    "| Greedy decode, T5.1.1 enc-dec (d 512, 8+8 layers, 8 × 512→114) | – | 50.0 tok/s "
    "| HF generate: 25.0 tok/s | 2.00× | – | – | 3.0 / 1.5 s | 1,900 / 1,600 MiB |",
    "| Decoder-only Llama (RoPE, SwiGLU) (d 512, 8 layers, 8 × 512) | adamw | 1,234 tok/s "
    "| HF eager (compile failed): 98.8 tok/s | 12.50× | 41.67× | 30.0% / 2.4% | 10.0 / 2.0 s "
    "| – |",
    "",
    "Generated by `benchmarks/readme_table.py` from results.jsonl (2026-12-05 10:00:00 UTC to "
    "2026-12-05 11:00:00 UTC). Peer: the faster of Hugging Face eager and under `torch.compile` "
    "(inductor), timed round-robin with moetx in the same run. MFU: model FLOPs per second over "
    "the fastest f32 matmul measured in the same run (200–210 GFLOP/s; bf16: 300–310 GFLOP/s). "
    "moetx / peer at the f32 peak: the ratio moetx would reach if its whole step ran at that "
    "matmul's speed, one over the peer's MFU. A float32 step that executes the model FLOPs "
    "beats the peer by more only if it runs faster than the fastest bare matmul measured here. "
    "Peak RSS: each side alone in a child process (2 steps) that first imports the libraries of "
    "both sides (moetx's bring TensorFlow through SeqIO), 1,436 MiB before any model is built. "
    "moetx's peak RSS with `MALLOC_ARENA_MAX=8` set, which turns its allocator setting (freed "
    "heap kept for reuse) off, against as shipped: 2,000 / 3,000 MiB (encdec_adafactor). "
    "Background load while timing: up to 0.20 cores. Failed rows (see the results file): "
    "switch_adamw.",
])


def written_between(results, tmp_path, start: str, end: str) -> str:
    """The text of a README holding the main table's markers and `start` ... `end`, after
    `readme_table.py results --write` rewrote it."""
    readme = tmp_path / "README.md"
    readme.write_text(f"{rt.START}\n{rt.END}\n{start}\n{end}\n")
    assert rt.main([str(results), "--write", str(readme)]) == 0
    return readme.read_text()


@pytest.fixture
def results(tmp_path):
    """A results file: a stale enc-dec line later replaced, Llama (compile failed), decode, a
    sweep line (plot only) and a failed row."""
    lines = [encdec_line(100.0, "2026-12-04 09:00:00 UTC"), LLAMA, DECODE,
             sweep_line(256, 5000.0, 4000.0, 4500.0), FAILURE,
             encdec_line(371.0, "2026-12-05 10:00:00 UTC")]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return path


def test_table_is_exactly_the_expected_markdown(results):
    assert rt.make_table(rt.load_results([str(results)])) == EXPECTED_TABLE


def test_lines_follow_the_order_their_rows_first_ran_even_after_a_failure():
    llama_failed = {**FAILURE, "row": LLAMA["row"]}
    enc = encdec_line(371.0, "2026-12-05 10:00:00 UTC")
    table = rt.make_table([llama_failed, enc, DECODE, LLAMA]).split("\n")
    assert [line.split(" | ")[0] for line in table[2:5]] == [
        "| Decoder-only Llama (RoPE, SwiGLU) (d 512, 8 layers, 8 × 512)",
        "| T5.1.1 enc-dec (d 512, 8+8 layers, 8 × 512→114)",
        "| Greedy decode, T5.1.1 enc-dec (d 512, 8+8 layers, 8 × 512→114)"]


def test_a_failed_row_run_again_successfully_is_no_longer_listed_as_failed():
    llama_failed = {**FAILURE, "row": LLAMA["row"]}
    listed = rt.caption([FAILURE, llama_failed, LLAMA])
    assert "Failed rows (see the results file): switch_adamw." in listed
    assert "decoder_llama_adamw" in rt.caption([LLAMA, llama_failed])


def test_peer_is_the_faster_hf_variant_and_ratio_is_moetx_over_it():
    # compile faster: chosen although the line's own `peer` field says eager.
    row = rt.to_row(encdec_line(371.0, "d"))
    assert (row.peer_label, row.peer) == ("HF torch.compile", 600.0)
    assert row.ratio == pytest.approx(371.0 / 600.0)
    # eager faster than a working compile: eager, without the failure note.
    line = {**encdec_line(371.0, "d"), "hf_compile_tokens_per_sec": 500.0}
    row = rt.to_row(line)
    assert (row.peer_label, row.peer) == ("HF eager", 567.0)
    assert (row.mfu_peer, row.first_peer, row.rss_peer) == (0.44, 11.0, 2500.0)
    assert row.ratio == pytest.approx(371.0 / 567.0)
    # a line from before the eager/compile split still has a peer.
    legacy = {"benchmark": "train_throughput", "model": {"d_model": 256, "layers": 4},
              "batch": 16, "length": 128, "moetx_tokens_per_sec": 5000.0,
              "hf_tokens_per_sec": 4000.0}
    assert rt.to_row(legacy).ratio == pytest.approx(1.25)


def test_ceiling_is_the_ratio_at_the_peak_one_over_the_chosen_peers_mfu():
    eager = rt.to_row({**encdec_line(371.0, "d"), "hf_compile_tokens_per_sec": 500.0})
    assert eager.ceiling == pytest.approx(1 / 0.44)
    # moetx at the peak (MFU 1) would be the ceiling: the ratio scales with moetx's MFU.
    at_peak = eager._replace(moetx=eager.moetx / eager.mfu_moetx, mfu_moetx=1.0)
    assert at_peak.ratio == pytest.approx(eager.ceiling, rel=0.02)
    assert rt.to_row(encdec_line(371.0, "d")).ceiling == pytest.approx(1 / 0.466)
    assert rt.to_row(DECODE).ceiling is None


def test_write_replaces_only_the_text_between_the_markers(results, tmp_path, capsys):
    before, after = "# moetx\n\nIntro.\n\n", "\n\n## Next section\nText.\n"
    old = f"{rt.START}\n| old | table |\n{rt.END}"
    readme = tmp_path / "README.md"
    readme.write_text(before + old + after)
    assert rt.main([str(results), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text == before + rt.START + "\n" + EXPECTED_TABLE + "\n" + rt.END + after
    assert capsys.readouterr().out.strip() == EXPECTED_TABLE  # also printed
    # Idempotent: a second run changes nothing.
    rt.main([str(results), "--write", str(readme)])
    assert readme.read_text() == text


@pytest.mark.parametrize("marker", [rt.START, rt.END])
def test_missing_marker_is_a_one_line_error_and_the_file_is_untouched(results, tmp_path,
                                                                      marker):
    readme = tmp_path / "README.md"
    original = f"intro\n{rt.START}\nold\n{rt.END}\n".replace(marker, "")
    readme.write_text(original)
    with pytest.raises(SystemExit) as e:
        rt.main([str(results), "--write", str(readme)])
    message = str(e.value.code)
    assert "\n" not in message and marker in message and "not found" in message
    assert readme.read_text() == original


def test_markers_out_of_order_are_refused():
    with pytest.raises(ValueError, match="comes before"):
        rt.rewrite(f"{rt.END}\n{rt.START}\n", "table")


def test_plot_writes_a_png_from_the_sweep_rows(results, tmp_path):
    records = rt.load_results([str(results)])
    records += [sweep_line(512, 2000.0, 1500.0, 1800.0), sweep_line(1024, 600.0, 500.0, 400.0)]
    pts = rt.sweep_points(records)
    assert [p["model"]["d_model"] for p in pts] == [256, 512, 1024]
    assert [rt.choose_peer(p)[0] for p in pts] == ["hf_compile", "hf_compile", "hf_eager"]
    out = tmp_path / "docs" / "bench_scaling.png"
    rt.plot_scaling(records, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no sweep rows"):
        rt.plot_scaling([LLAMA], str(tmp_path / "none.png"))


def profile_line(moetx_mlp_ms: float, date: str) -> dict:
    """A profile_step line: every family 10 ms on both sides but moetx's MLP and the hosts."""
    fams = lambda mlp, total: {  # noqa: E731
        f: {"ms": mlp if f == "mlp" else 10.0,
            "share": (mlp if f == "mlp" else 10.0) / total} for f in rt.FAMILY_LABELS
        if f != "host"}
    mx_total, hf_total = 90.0 + moetx_mlp_ms, 100.0
    return {"benchmark": "profile_step", "row": "profile_encdec",
            "run_all": {"mode": "side_by_side"},
            "model": {"d_model": 512, "layers": 8, "heads": 6, "head_dim": 64, "d_ff": 1024,
                      "vocab": 32128}, "batch": 8, "input_length": 512, "target_length": 114,
            "table_ms_per_step": {},
            "moetx": {"step_wall_ms": 150.0, "step_unprofiled_ms": 140.0, "host_ms": 25.0,
                      "concurrency": 1.25, "families": fams(moetx_mlp_ms, mx_total),
                      "op_kinds_ms": {"dot": 60.0, "fusion": 30.5, "copy": 4.0}},
            "hf": {"step_wall_ms": 110.0, "step_unprofiled_ms": 105.0, "host_ms": 5.0,
                   "families": fams(10.0, hf_total)},
            "background_cpu_cores": {"moetx": 0.02, "hf": 0.01}, "date": date}


def test_profile_line_becomes_its_own_table_and_stays_out_of_the_main_one(results, tmp_path):
    lines = [profile_line(99.0, "2026-12-05 08:00:00 UTC"),
             profile_line(40.0, "2026-12-05 09:00:00 UTC")]  # the later line wins
    with open(results, "a") as f:
        f.write("".join(json.dumps(rec) + "\n" for rec in lines))
    records = rt.load_results([str(results)])
    assert rt.make_table(records) == EXPECTED_TABLE  # neither its row nor its date or load
    table = rt.make_profile_table(records).split("\n")
    assert table[0].startswith("| op family | moetx ms/step")
    assert len(table) == 2 + len(rt.FAMILY_LABELS) + 2
    assert table[2] == ("| attention scores + softmax (QKᵀ, mask and bias add, softmax, AV) "
                        "| 10 | 7.7% | 10 | 10.0% | +0 |")
    assert table[5] == "| MLP (gated GELU) | 40 | 30.8% | 10 | 10.0% | +30 |"
    assert table[12] == "| host (step wall time not covered by ops) | 25 | – | 5 | – | +20 |"
    assert "(2026-12-05 09:00:00 UTC)" in table[-1] and "1.25" in table[-1]
    assert "moetx 150 ms a profiled step (140 unprofiled), HF eager 110 (105)" in table[-1]
    assert "dot 60, fusion 30, copy 4" in table[-1]
    # --write fills both sections; a README without the profile markers is refused.
    readme = tmp_path / "README.md"
    readme.write_text(f"{rt.START}\n{rt.END}\ntext\n{rt.PROFILE_START}\nold\n{rt.PROFILE_END}\n")
    assert rt.main([str(results), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"{rt.START}\n{EXPECTED_TABLE}\n{rt.END}\ntext\n")
    assert "\n".join(table) in text and "old" not in text
    readme.write_text(f"{rt.START}\n{rt.END}\n")
    with pytest.raises(SystemExit, match="profile-table:start"):
        rt.main([str(results), "--write", str(readme)])
    assert rt.make_profile_table(rt.load_results([str(results)])[:3]) is None


def vision_profile_line(model: str, moetx_norm_ms: float, date: str) -> dict:
    """A profile_vision line: every family 10 ms on both sides but moetx's norms and hosts."""
    fams = lambda norm, total: {  # noqa: E731
        f: {"ms": norm if f == "norm" else 10.0,
            "share": (norm if f == "norm" else 10.0) / total} for f in rt.VISION_FAMILY_LABELS
        if f != "host"}
    return {"benchmark": "profile_vision", "row": f"profile_vision_{model.split('/')[0]}",
            "run_all": {"mode": "side_by_side"}, "model": model, "timm_model": "timm_" + model,
            "image_size": 64, "batch": 16, "table_ms_per_step": {},
            "moetx": {"step_wall_ms": 200.0, "step_unprofiled_ms": 190.0, "host_ms": 30.0,
                      "concurrency": 1.1, "families": fams(moetx_norm_ms, 90.0 + moetx_norm_ms),
                      "op_kinds_ms": {"convolution": 50.0, "loop_fusion": 20.0},
                      "primitives_ms": {"erfc": 40.0, "?": 12.0}},
            "timm": {"step_wall_ms": 100.0, "step_unprofiled_ms": 95.0, "host_ms": 2.0,
                     "families": fams(10.0, 100.0)},
            "background_cpu_cores": {"moetx": 0.0, "timm": 0.0}, "date": date}


def test_vision_profile_lines_become_one_table_per_model(results, tmp_path):
    lines = [vision_profile_line("coatnet/0", 99.0, "2026-12-05 08:00:00 UTC"),
             vision_profile_line("efficientnet_v2/b0", 10.0, "2026-12-05 08:30:00 UTC"),
             vision_profile_line("coatnet/0", 60.0, "2026-12-05 09:00:00 UTC")]  # replaces
    with open(results, "a") as f:
        f.write("".join(json.dumps(rec) + "\n" for rec in lines))
    records = rt.load_results([str(results)])
    assert rt.make_table(records) == EXPECTED_TABLE
    assert rt.make_profile_table(records) is None
    tables = rt.make_vision_profile_tables(records).split("\n\n")
    assert len(tables) == 6  # per model: its title, its table, its caption
    title, coatnet, caption = tables[0], tables[1].split("\n"), tables[2]
    assert title == ("**coatnet/0** (64², batch 16, SGD; timm `timm_coatnet/0`): moetx 200 ms "
                     "a profiled step (190 unprofiled), timm 100 (95).")
    assert coatnet[0] == ("| op family | moetx ms/step | moetx share | timm ms/step | timm share "
                          "| moetx − timm ms |")
    assert len(coatnet) == 2 + len(rt.VISION_FAMILY_LABELS)
    assert coatnet[4] == "| batch and layer norms | 60 | 40.0% | 10 | 10.0% | +50 |"
    assert coatnet[-1] == ("| host (step wall time not covered by ops) | 30 | – | 2 | – "
                           "| +28 |")
    assert "(2026-12-05 09:00:00 UTC)" in caption
    assert "convolution 50, loop_fusion 20" in caption
    assert "By JAX primitive (ms; `?`: XLA-made, no metadata): erfc 40, ? 12." in caption
    # moetx's nine other families at 10 / 1.1 ms, timm's norms at 10, timm's host 2 ms; no
    # throughput line of the model gives FLOPs, so no MFU.
    assert caption.endswith("makes a step of 94 ms, 1.07× timm's profiled step.")
    assert tables[4].split("\n")[4].startswith("| batch and layer norms | 10 |")
    assert tables[3].startswith("**efficientnet_v2/b0**")
    readme = tmp_path / "README.md"
    readme.write_text(f"{rt.START}\n{rt.END}\n{rt.VISION_PROFILE_START}\nold\n"
                      f"{rt.VISION_PROFILE_END}\n")
    assert rt.main([str(results), "--write", str(readme)]) == 0
    assert "\n\n".join(tables) in readme.read_text() and "old" not in readme.read_text()


def profiled_side(labels: dict, family: str, family_ms: float, wall: float) -> dict:
    """One side of a profile: 10 ms in every family of `labels` but `family`, which takes
    `family_ms`; a profiled step of `wall` ms, 5 ms longer than the unprofiled one."""
    fams = {f: 10.0 for f in labels if f != "host"}
    fams[family] = family_ms
    total = sum(fams.values())
    return {"step_wall_ms": wall, "step_unprofiled_ms": wall - 5, "host_ms": 4.0,
            "concurrency": 1.2, "op_kinds_ms": {"dot": 50.0},
            "families": {f: {"ms": v, "share": v / total} for f, v in fams.items()}}


def table_once_appended(results, line: dict, make) -> list[str]:
    """`make(records)` is None on the fixture lines (they hold no profile) and, once `line` is
    appended to the results file, a table: its lines."""
    assert make(rt.load_results([str(results)])) is None
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    return make(rt.load_results([str(results)])).split("\n")


def test_a_profiled_moe_vs_dense_line_also_becomes_the_moe_profile_table(results, tmp_path):
    def side(router_ms: float, wall: float) -> dict:
        return profiled_side(rt.MOE_FAMILY_LABELS, "router", router_ms, wall)

    line = {"benchmark": "moe_vs_dense", "row": "moe_vs_dense",
            "model": {"d_model": 512, "layers": 8, "experts": 8, "top_k": 1,
                      "sparse_every": 2}, "batch": 8, "length": 512,
            "moe_tokens_per_sec": 600.0, "dense_tokens_per_sec": 660.0,
            "profile": {"moe": side(30.0, 110.0), "dense": side(0.0, 100.0)},
            "date": "2026-12-05 20:00:00 UTC"}
    table = table_once_appended(results, line, rt.make_moe_profile_table)
    assert table[0] == ("| op family | MoE ms/step | MoE share | dense ms/step | dense share "
                        "| MoE − dense ms |")
    assert table[4] == "| router (logits, top-k, capacity masks) | 30 | 27.3% | 0 | 0.0% | +30 |"
    assert "MoE 110 ms a profiled step (105 unprofiled), dense 100 (95)" in table[-1]
    assert "top-1 of 8 experts (masked dispatch) in one layer of every 2" in table[-1]


def test_a_profiled_switch_line_also_becomes_the_switch_profile_table(results, tmp_path):
    def side(experts_ms: float, wall: float) -> dict:
        return profiled_side(rt.SWITCH_FAMILY_LABELS, "experts", experts_ms, wall)

    line = {"benchmark": "moetx_vs_hf_switch", "row": "switch_adafactor",
            "run_all": {"mode": "side_by_side"},
            "model": {"d_model": 512, "encoder_layers": 8, "decoder_layers": 8, "experts": 8,
                      "top_k": 1, "sparse_every": 2, "moetx_dispatch": "scatter"},
            "batch": 8, "input_length": 512, "target_length": 114,
            "optimizer": {"name": "adafactor"},
            "moetx_tokens_per_sec": 900.0, "hf_eager_tokens_per_sec": 980.0,
            "expert_rows": {"routed": 20032, "moetx": 25024, "hf": 10689},
            "model_flops_per_step": 4.366666667e9, "peak_flops_f32_matmul": 1e11,
            "profile": {"moetx": side(60.0, 150.0), "hf_eager": side(20.0, 120.0)},
            "date": "2026-12-06 20:00:00 UTC"}
    table = table_once_appended(results, line, rt.make_switch_profile_table)
    assert table[0] == ("| op family | moetx ms/step | moetx share | HF eager ms/step | HF eager "
                        "share | moetx − HF ms |")
    assert table[6] == "| expert MLPs | 60 | 42.9% | 20 | 20.0% | +40 |"
    assert "moetx 150 ms a profiled step (145 unprofiled), HF eager 120 (115)" in table[-1]
    assert ("20,032 routed (what the MFU's model FLOPs count), moetx 25,024 (every slot of its "
            "capacity buffers), HF 10,689") in table[-1]
    assert "top-1 of 8 experts (scatter dispatch in moetx) in one layer of every 2" in table[-1]
    # Both sides at op time / busy time 1.2: eight families at 10 / 1.2 ms, HF's experts at
    # 20 / 1.2, host 4 ms: 87.3 ms, HF's 120 ms over it, and the line's FLOPs over that time.
    assert ("makes a step of 87 ms, 1.37× HF eager's profiled step and 50.0% MFU at this line's "
            "f32 matmul peak (100 GFLOP/s).") in table[-1]
    readme = tmp_path / "README.md"
    readme.write_text(f"{rt.START}\n{rt.END}\n{rt.SWITCH_PROFILE_START}\nold\n"
                      f"{rt.SWITCH_PROFILE_END}\nb\n")
    assert rt.main([str(results), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| expert MLPs | 60 |" in text and text.endswith("b\n")


def test_best_of_both_takes_the_faster_side_per_family_after_each_sides_overlap():
    a = {"host_ms": 30.0, "concurrency": 1.5,
         "families": {"conv": {"ms": 150.0}, "norm": {"ms": 30.0}, "other": {"ms": 15.0}}}
    b = {"host_ms": 5.0,  # no concurrency: torch's ops run one at a time
         "families": {"conv": {"ms": 120.0}, "norm": {"ms": 10.0}, "other": {"ms": 10.0}}}
    ms, picks = rt.best_of_both(a, b)
    # conv: 150 / 1.5 = 100 against 120; norm: 20 against 10; other: 10 against 10 (a's, tie).
    assert ms == pytest.approx(100.0 + 10.0 + 10.0 + 5.0)
    assert picks == {"conv": "a", "norm": "b", "other": "a"}
    assert rt.best_of_both(b, b)[0] == pytest.approx(145.0)  # a side against itself: its ops


def means_line(date: str) -> dict:
    """A means.py line: bf16 twice as fast, remat slower, the baseline 10% slower at the end."""
    def variant(s: float, loss: float) -> dict:
        return {"seconds_per_step": s, "tokens_per_sec": 5008 / s, "first_step_s": 20.0,
                "mfu_f32": 1.0 / s / 2, "mfu_bf16": 1.0 / s / 8, "loss_last": loss,
                "speedup_vs_baseline": 10.5 / s}
    return {"benchmark": "means", "row": "means", "run_all": {"mode": "side_by_side"},
            "model": {"d_model": 512, "layers": 8, "heads": 6, "head_dim": 64, "d_ff": 1024,
                      "vocab": 32128}, "batch": 8, "input_length": 512, "target_length": 114,
            "steps": 3, "optimizer": {"name": "adafactor"},
            "variants": {"baseline": variant(10.0, 9.5), "bf16": variant(5.25, 9.5012),
                         "remat_full": variant(14.0, 9.5), "baseline_again": variant(11.0, 9.5)},
            "baseline_drift": 1.1, "peak_flops_f32_matmul": 270e9,
            "peak_flops_bf16_matmul": 1000e9, "background_cpu_cores": {"matmul": 0.0},
            "date": date}


def test_means_line_becomes_its_own_table(results, tmp_path):
    with open(results, "a") as f:
        f.write(json.dumps(means_line("2026-12-05 09:30:00 UTC")) + "\n")
    records = rt.load_results([str(results)])
    assert rt.make_table(records) == EXPECTED_TABLE
    assert rt.make_profile_table(records) is None
    table = rt.make_means_table(records).split("\n")
    assert table[2] == ("| as shipped (float32, no remat, unrolled layers) | 10.00 | 501 | 1.05× "
                        "| 5.0% / 1.2% | 20.0 s | 9.5000 |")
    assert table[3].startswith("| bfloat16 activations") and "| 2.00× |" in table[3]
    assert table[5].startswith("| as shipped, measured again last | 11.00 |")
    assert "differ by 10.0%" in table[-1] and "f32 270, bf16 1,000 GFLOP/s" in table[-1]
    assert "\n".join(table) in written_between(results, tmp_path, rt.MEANS_START, rt.MEANS_END)


def test_means_table_shows_xla_peak_memory_where_the_line_has_it(results):
    line = means_line("2026-12-05 09:30:00 UTC")
    mib = 2**20
    for name, v in line["variants"].items():
        v["memory"] = {"peak_bytes_estimate": (300 if name == "remat_full" else 500) * mib}
    line["variants"]["no_donation"] = dict(line["variants"]["baseline"],
                                           memory={"peak_bytes_estimate": 1200 * mib})
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    table = rt.make_means_table(rt.load_results([str(results)])).split("\n")
    assert table[0].endswith("| first step | XLA's peak estimate | loss after the steps |")
    assert table[1].count("---") == 8
    assert table[2].endswith("| 20.0 s | 500 MiB | 9.5000 |")
    assert table[4].startswith("| rematerialise every layer") and "| 300 MiB |" in table[4]
    assert table[6].startswith("| no buffer donation") and "| 1,200 MiB |" in table[6]
    assert "the bytes donated arguments share with outputs" in table[-1]


def test_input_pipeline_line_becomes_its_tables(results, tmp_path):
    counts = lambda loss, dec, enc=None: {  # noqa: E731
        "loss_tokens": loss, "decoder_filled": dec, **({"encoder_filled": enc} if enc else {})}
    figures = lambda s, i, o: {"seconds_per_step": s, "input_seconds_per_step": i,  # noqa: E731
                               "other_cpu_cores": o}
    line = {"benchmark": "input_pipeline", "row": "input_pipeline",
            "run_all": {"mode": "side_by_side"}, "batches": 50, "batch": 8, "steps": 60,
            "log_every": 10, "repeats": 2, "date": "2026-12-05 23:00:00 UTC",
            "packing": {
                "causal_lm": {"packed": counts(1000, 0.98), "unpacked": counts(500, 0.49),
                              "loss_tokens_ratio": 2.0, "feature_lengths": {"targets": 128}},
                "span_corruption": {"packed": counts(800, 0.9, 0.95),
                                    "unpacked": counts(200, 0.2, 0.25), "loss_tokens_ratio": 4.0,
                                    "feature_lengths": {"inputs": 512, "targets": 114}}},
            "prefetch": {"demo_t5": {"mean": {"0": figures(0.2, 0.01, 0.05),
                                              "2": figures(0.25, 0.001, 0.05)}}}}
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    records = rt.load_results([str(results)])
    assert rt.make_table(records) == EXPECTED_TABLE  # not a row of the main table
    table = rt.make_input_pipeline_table(records).split("\n")
    assert table[2] == "| causal LM (128) | 1,000 | 500 | 2.00× | 98% / 49% |"
    assert table[3] == ("| span corruption (512 → 114) | 800 | 200 | 4.00× "
                        "| decoder 90% / 20%; encoder 95% / 25% |")
    assert table[7].endswith("| 0 | 200 | 10.0 | 0.05 | 1.00× |")
    assert table[8].endswith("| 2 | 250 | 1.0 | 0.05 | 0.80× |")
    assert "first 50 batches of 8 rows" in table[-1] and "trained 2 times for 60" in table[-1]
    assert "without prefetching first each time" in table[-1]  # a line from before `order`
    assert "\n".join(table) in written_between(results, tmp_path, rt.INPUT_START, rt.INPUT_END)
    line["prefetch"]["demo_t5"]["order"] = [0, 2, 2, 0]
    line["date"] = "2026-12-05 23:30:00 UTC"
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    caption = rt.make_input_pipeline_table(rt.load_results([str(results)])).split("\n")[-1]
    assert "(in the order 0, 2, 2, 0)" in caption


def ops_line(date: str) -> dict:
    """A step_ops.py line: two attention variants at two shapes, two loss-head variants."""
    def shape(lq: int, lk: int, einsum_ms: float, chunk_ms: float) -> dict:
        variant = lambda ms: {"median_ms": ms, "per_step_ms": 8 * ms,  # noqa: E731
                              "speedup_vs_first": einsum_ms / ms}
        return {"query_length": lq, "key_length": lk, "layers": 8,
                "variants": {"einsum": variant(einsum_ms), "query_chunks": variant(chunk_ms)}}
    return {"benchmark": "step_ops", "row": "step_ops", "run_all": {"mode": "side_by_side"},
            "batch": 8, "heads": 6, "head_dim": 64, "chunk": 128, "loss_chunk": 128, "steps": 10,
            "attention": {"encoder_self": shape(512, 512, 100.0, 80.0),
                          "cross": shape(114, 512, 20.0, 20.0)},
            "loss_head": {"tokens": 912, "d_model": 512, "vocab": 32128,
                          "variants": {"full": {"median_ms": 60.0, "speedup_vs_first": 1.0},
                                       "chunked": {"median_ms": 75.0,
                                                   "speedup_vs_first": 0.8}}},
            "date": date}


def test_step_ops_line_becomes_its_own_tables(results, tmp_path):
    with open(results, "a") as f:
        f.write(json.dumps(ops_line("2026-12-05 13:00:00 UTC")) + "\n")
    records = rt.load_results([str(results)])
    assert rt.make_table(records) == EXPECTED_TABLE  # not a row of the main table
    table = rt.make_ops_table(records).split("\n")
    assert table[0] == ("| attention, forward + backward | encoder self 512×512 (ms) "
                        "| cross 114×512 (ms) | per step (ms) | vs einsum |")
    # per step: (100 + 20) x 8 = 960 against (80 + 20) x 8 = 800.
    assert table[2] == "| einsum (moetx today) | 100.0 | 20.0 | 960 | 1.00× |"
    assert table[3] == "| query-blocked, rematerialised | 80.0 | 20.0 | 800 | 1.20× |"
    assert "| token-chunked, rematerialised | 75.0 | 0.80× |" in table
    assert "912 tokens × 512 → 32,128" in table[5]
    assert "each attention shape × 8 layers" in table[-1]
    readme = tmp_path / "README.md"
    readme.write_text(f"{rt.START}\n{rt.END}\n{rt.OPS_START}\nold\n{rt.OPS_END}\n")
    assert rt.main([str(results), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert "\n".join(table) in text and "old" not in text
    readme.write_text(f"{rt.START}\n{rt.END}\n")
    with pytest.raises(SystemExit, match="ops-table:start"):
        rt.main([str(results), "--write", str(readme)])


def test_compile_cache_line_becomes_its_table(results, tmp_path):
    run = lambda i, c, w, o: {"init_or_restore_s": i, "compilation_s": c,  # noqa: E731
                              "command_s": w, "other_cpu_cores": o}
    line = {"benchmark": "compile_cache", "row": "compile_cache",
            "run_all": {"mode": "side_by_side"}, "steps": 2, "repeats": 1,
            "date": "2026-12-06 03:00:00 UTC",
            "setups": {"demo": {
                "runs": {"cold": [run(6.0, 6.0, 30.0, 0.05)], "warm": [run(1.5, 1.5, 20.0, 0.2)]},
                "mean": {"cold": run(6.0, 6.0, 30.0, None), "warm": run(1.5, 1.5, 20.0, None)},
                "first_step_speedup": 4.0}}}
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    records = rt.load_results([str(results)])
    assert rt.make_table(records) == EXPECTED_TABLE  # not a row of the main table
    table = rt.make_compile_cache_table(records).split("\n")
    assert table[2] == ("| `make demo` (MoE-Primer decoder, 16 × 128) | cold | 6.0 | 6.0 | – "
                        "| 30.0 |")
    assert table[3].endswith("| warm | 1.5 | 1.5 | 4.0× sooner | 20.0 |")
    assert "2 steps from a new `MODEL_DIR`" in table[-1] and "0.20 CPU cores at most" in table[-1]
    assert "\n".join(table) in written_between(results, tmp_path, rt.CACHE_START, rt.CACHE_END)


def test_moe_row_shows_the_faster_dispatch_and_names_the_other():
    line = {"benchmark": "moe_vs_dense", "model": {"d_model": 512, "layers": 8, "experts": 8,
                                                   "top_k": 1},
            "batch": 8, "length": 512, "dense_tokens_per_sec": 500.0, "dense_mfu": 0.3,
            "moe_tokens_per_sec": 450.0, "overhead_ratio": 500.0 / 450.0, "moe_mfu": 0.27,
            "moe_scatter_tokens_per_sec": 480.0, "overhead_ratio_scatter": 500.0 / 480.0,
            "moe_scatter_mfu": 0.29}
    row = rt.to_row(line)
    assert (row.moetx, row.mfu_moetx) == (480.0, 0.29)
    assert "scatter dispatch (masked: step 1.11× dense)" in row.label
    row = rt.to_row({**line, "moe_scatter_tokens_per_sec": 400.0,
                     "overhead_ratio_scatter": 1.25})
    assert row.moetx == 450.0 and "masked dispatch (scatter: step 1.25× dense)" in row.label
    old = {k: v for k, v in line.items() if "scatter" not in k}  # lines before the scatter MoE
    row = rt.to_row(old)
    assert row.moetx == 450.0 and "dispatch" not in row.label
