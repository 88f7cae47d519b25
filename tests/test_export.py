"""Export artifacts beyond the weights: ``model.onnx`` (verified in onnxruntime at write time)
and ``pareto.png`` (DESIGN.md §4)."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import image_batch, space_of
from pruning import export as export_mod
from pruning.export import ExportError, export_model, onnx_session, sha256_file
from pruning.modules import build
from pruning.report import pareto_front, pareto_png, plot_pareto
from pruning.search import Record

pytestmark = pytest.mark.usefixtures("single_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(i: int, macs: int, score: float) -> Record:
    return Record(key=f"k{i}", choices=(i,), widths={"g": i}, macs=macs, params=macs // 10,
                  score=score, generation=i // 4)


HISTORY = [record(i, 1_000_000 + 37_000 * ((i * 7) % 23), 0.3 + 0.02 * ((i * 5) % 17))
           for i in range(40)]


def _net(arch: str, seed: int = 0, weight_seed: int | None = None):
    space = space_of(arch)
    cand = space.random(random.Random(seed))
    torch.manual_seed(seed if weight_seed is None else weight_seed)
    net = build(space, cand).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that folding them is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return space, cand, net


@pytest.fixture(scope="module", params=["test_resnet", "test_mobilenet_v2"])
def exported(request, single_thread, tmp_path_factory):
    space, cand, net = _net(request.param)
    folder = tmp_path_factory.mktemp(f"export_{request.param}")
    best = max(HISTORY, key=lambda r: r.score)
    png = pareto_png(HISTORY, best, (1_200_000, 0.35), 1_500_000)
    config = export_model(folder, net, space, cand, sample=image_batch(space, 3),
                          files={"pareto.png": png, "notes.json": b"{}"})
    return folder, space, net, config


def test_onnx_loads_and_matches_at_any_batch(exported):
    folder, space, net, _ = exported
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = onnx_session(folder / "model.onnx", threads=1)
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # symbolic batch dimension
    for n in (1, 5):
        x = image_batch(space, n, seed=10 + n)
        got = session.run(["logits"], {"images": x.numpy()})[0]
        with torch.inference_mode():
            want = net(x).numpy()
        assert got.shape == want.shape == (n, want.shape[1])
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


def test_config_hashes_cover_onnx_and_pareto(exported):
    folder, _, _, config = exported
    assert set(config["files"]) == {"model.safetensors", "model.ts", "model.onnx", "pareto.png",
                                    "notes.json"}
    on_disk = json.loads((folder / "config.json").read_text())
    assert on_disk["files"] == config["files"]
    for name, digest in config["files"].items():
        assert sha256_file(folder / name) == digest
    assert {"onnx", "onnxruntime"} <= set(config["versions"])
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]  # no temp files left


def test_pareto_png_is_a_valid_image(exported):
    data = (exported[0] / "pareto.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and 5_000 < len(data) < 2_000_000
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and 300 <= img.width <= 3000 and 200 <= img.height <= 3000


def test_tampered_onnx_is_refused(single_thread, tmp_path, monkeypatch):
    space, cand, net = _net("test_resnet")
    other = _net("test_resnet", weight_seed=1)[2]  # the same net with other weights
    with torch.inference_mode():
        x = image_batch(space, 2)
        assert not torch.allclose(net(x), other(x), atol=1e-3, rtol=1e-3)
    real = export_mod._onnx
    monkeypatch.setattr(export_mod, "_onnx", lambda n, sample: real(other, sample))
    with pytest.raises(ExportError, match="model.onnx"):
        export_model(tmp_path, net, space, cand, sample=image_batch(space, 2))
    assert not (tmp_path / "config.json").exists()  # nothing vouches for the bad export

    monkeypatch.setattr(export_mod, "_onnx", lambda n, sample: b"not an onnx model")
    with pytest.raises(ExportError, match="model.onnx"):
        export_model(tmp_path, net, space, cand, sample=image_batch(space, 2))


def test_model_onnx_is_not_an_extra_file_name(tmp_path):
    space, cand, net = _net("test_resnet")
    with pytest.raises(ValueError):
        export_model(tmp_path, net, space, cand, files={"model.onnx": b"x"})


def test_an_export_refuses_a_sample_of_other_images_and_onnx_over_2_gib(tmp_path):
    """A sample of another image size would fix the ONNX graph to it (config.json says
    otherwise); weights over ONNX's 2 GiB are one clear error, not the exporter's traceback."""
    space, cand, net = _net("test_resnet")
    c, h, w = space.input_shape
    with pytest.raises(ValueError, match=r"the sample is of \(1, 16, 16\) images"):
        export_model(tmp_path, net, space, cand, sample=torch.randn(2, c, 16, 16))
    assert not any(tmp_path.iterdir())
    huge = torch.nn.Linear(1 << 16, 1 << 14, device="meta")  # 4 GiB of float32, not allocated
    with pytest.raises(ValueError, match=r"4.00 GiB of weights do not fit one ONNX file"):
        export_mod._onnx(huge, torch.zeros(1, 1 << 16, device="meta"))


def test_plot_with_a_single_record_and_no_baseline(tmp_path):
    only = record(0, 2_000_000, 0.5)
    data = plot_pareto([only], only, None, None, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes() == data and data.startswith(PNG_MAGIC)
    with Image.open(tmp_path / "pareto.png") as img:
        assert img.format == "PNG" and img.width > 100
    # dict records (as in search.json) work too, and the same input gives the same bytes
    dicts = [r.to_dict() for r in HISTORY]
    a = pareto_png(dicts, dicts[0], (1_000_000, 0.3), 2e6)
    assert a == pareto_png(HISTORY, HISTORY[0], (1_000_000, 0.3), 2e6)
    with pytest.raises(ValueError):
        pareto_png([], only)


def test_pareto_front():
    pts = [(3, 0.5), (1, 0.2), (2, 0.6), (2, 0.1), (4, 0.55), (5, 0.7)]
    assert pareto_front(pts) == [(1, 0.2), (2, 0.6), (5, 0.7)]
