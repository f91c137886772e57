"""`hf-ibproj push` against a local fake Hub (tests/hub_server.py) on 127.0.0.1, then downloads in a fresh process.

The push runs in this process with huggingface_hub's endpoint patched; the downloads run in a subprocess whose
HF_ENDPOINT points at the fake Hub (huggingface_hub reads it at import), with an empty cache and no token.
A test against the Hub's CI endpoint runs only when HUGGINGFACE_CO_STAGING is set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from huggingface_hub import constants

from hf_ibproj import IBProjModel, export_backbone
from hf_ibproj.cli import main as cli_main
from hf_ibproj.hub import push_to_hub
from hub_server import FakeHub
from test_export import features, make_model, make_run_folder, snapshot

TOKEN = "hf_test_secret_XYZ"
BACKBONE_ID = "tester/tiny-resnet"
FULL_ID = "tester/tiny-resnet-full"
PIL_COLOR = (128, 64, 32)  # the stand-in image of the card snippets (model_cards/backbone.md)


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", server.endpoint)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain NDJSON commits, which the fake Hub speaks
        patch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """A stock-resnet18 run folder with its export, pushed as backbone and as full model through the CLI."""
    model = make_model("resnet18", 3, 32)
    run = make_run_folder(tmp_path_factory.mktemp("published"), model)
    export_backbone(run, run / "backbone")
    before = snapshot(run)
    assert cli_main(["push", str(run), "--repo-id", BACKBONE_ID, "--private", "--commit-message", "tiny"]) == 0
    assert cli_main(["push", str(run), "--repo-id", FULL_ID, "--full-model"]) == 0
    return model, run, before


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_push_uploads_the_export_and_the_token_only_travels_in_the_header(hub, published):
    _, run, before = published
    assert snapshot(run) == before  # nothing local was written, not even the README with the repo id
    uploaded = hub.files(BACKBONE_ID)
    local = snapshot(run / "backbone")
    assert set(uploaded) == set(local) == {"README.md", "config.json", "model.safetensors", "information_plane.png"}
    for name in ("config.json", "model.safetensors", "information_plane.png"):
        assert uploaded[name] == local[name]
    readme = uploaded["README.md"].decode()
    assert f'"hf-hub:{BACKBONE_ID}"' in readme and "<your-username>" not in readme
    assert hub.repos[BACKBONE_ID].private and not hub.repos[FULL_ID].private

    writes = [r for r in hub.requests if r.method == "POST" and r.path != "/api/validate-yaml"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)
    for repo in hub.repos.values():
        for revision in repo.branches.values():
            assert not any(TOKEN.encode() in data for data in revision.files.values())
    assert not any(TOKEN.encode() in data for data in snapshot(run).values())


_FRESH_DOWNLOADS = textwrap.dedent("""
    import json, sys
    import timm, torch
    from transformers import AutoModel
    backbone_id, full_id, x_file, snippets_file, out_file = sys.argv[1:]
    x = torch.load(x_file)
    snippets = json.loads(open(snippets_file).read())
    out = {}
    with torch.no_grad():
        out["timm"] = timm.create_model("hf-hub:" + backbone_id, pretrained=True).eval()(x)
        out["auto_model"] = AutoModel.from_pretrained(backbone_id).eval()(x).pooler_output
    out["snippets"] = []
    for code in snippets["backbone"]:
        namespace = {}
        exec(code, namespace)
        result = namespace.get("features")  # the fine-tuning snippet builds a classifier instead
        out["snippets"].append(result if result is not None else namespace["classifier"].config.num_labels)
    assert "hf_ibproj" not in sys.modules, "loading the stock backbone imported hf_ibproj"

    import hf_ibproj
    out["full_loaded"] = AutoModel.from_pretrained(full_id).state_dict()
    namespace = {}
    exec(snippets["full"][0], namespace)  # the card's continue-pretraining snippet: forward, backward, step
    out["full_type"] = type(namespace["model"]).__name__
    out["full_loss"] = namespace["loss"].detach()
    out["full_stepped"] = namespace["model"].state_dict()
    torch.save(out, out_file)
""")


def test_downloads_give_identical_features_and_the_card_snippets_run(hub, published, tmp_path):
    model, run, _ = published
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    snippets = {
        "backbone": _python_blocks(hub.files(BACKBONE_ID)["README.md"].decode()),
        "full": _python_blocks(hub.files(FULL_ID)["README.md"].decode()),
    }
    assert len(snippets["backbone"]) == 4 and len(snippets["full"]) == 1
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    (tmp_path / "download.py").write_text(_FRESH_DOWNLOADS)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_TOKEN")  # a public download needs no token
    subprocess.run([sys.executable, str(tmp_path / "download.py"), BACKBONE_ID, FULL_ID, str(tmp_path / "x.pt"),
                    str(tmp_path / "snippets.json"), str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")

    expected = features(model, x)
    assert (out["timm"] - expected).abs().max() <= 1e-6
    assert (out["auto_model"] - expected).abs().max() <= 1e-6
    # The snippets' stand-in image is constant, so its preprocessing has a closed form: /255, then mean/std.
    mean, std = torch.tensor(model.config.image_mean), torch.tensor(model.config.image_std)
    pixel = (torch.tensor(PIL_COLOR) / 255.0 - mean) / std
    image_features = features(model, pixel[None, :, None, None].expand(1, 3, 32, 32))
    timm_snippet, transformers_snippet, pipeline_snippet, finetune_snippet = out["snippets"]
    for snippet_features in (timm_snippet, transformers_snippet, pipeline_snippet):
        assert (snippet_features - image_features).abs().max() <= 1e-6
    assert finetune_snippet == 10

    # Full model: loads back exactly after `import hf_ibproj`, and the card's snippet continues pretraining.
    saved = IBProjModel.from_pretrained(run / "model").state_dict()
    assert out["full_type"] == "IBProjModel"
    assert set(out["full_loaded"]) == set(saved)
    assert all(torch.equal(out["full_loaded"][k], v) for k, v in saved.items())
    assert torch.isfinite(out["full_loss"])
    changed = [k for k, v in saved.items() if v.is_floating_point() and not torch.equal(out["full_stepped"][k], v)]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert "import hf_ibproj" in hub.files(FULL_ID)["README.md"].decode()


def test_invalid_repo_id_is_rejected_before_any_request(hub, published, capsys):
    _, run, before = published
    requests = len(hub.requests)
    assert cli_main(["push", str(run), "--repo-id", "not a/valid repo/id"]) == 2
    assert "invalid --repo-id" in capsys.readouterr().err
    assert len(hub.requests) == requests and snapshot(run) == before


def test_source_without_model_is_rejected_before_any_request(hub, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing here")
    requests = len(hub.requests)
    assert cli_main(["push", str(tmp_path), "--repo-id", "tester/empty"]) == 2
    assert "no IBProjModel" in capsys.readouterr().err
    assert len(hub.requests) == requests and snapshot(tmp_path) == {"notes.txt": b"nothing here"}


def test_server_error_during_commit_is_clear_and_leaves_folders_unchanged(hub, tmp_path, capsys):
    run = make_run_folder(tmp_path, make_model("resnet18", 3, 32))  # no backbone/: push exports it to staging
    before = snapshot(run)
    hub.fail_commits = True
    try:
        assert cli_main(["push", str(run), "--repo-id", "tester/broken"]) == 1
    finally:
        hub.fail_commits = False
    error = capsys.readouterr().err
    assert "tester/broken" in error and "500" in error and "Local folders are unchanged" in error
    assert TOKEN not in error
    assert snapshot(run) == before and not (run / "backbone").exists()
    assert hub.files("tester/broken") == {}


@pytest.mark.skipif(not os.environ.get("HUGGINGFACE_CO_STAGING"), reason="needs the Hub's CI endpoint")
def test_push_and_load_on_hub_ci(tmp_path):
    """Against hub-ci.huggingface.co (huggingface_hub's staging switch); HF_TOKEN must be a hub-ci token."""
    import timm
    from huggingface_hub import HfApi

    if not os.environ.get("HF_TOKEN"):
        pytest.skip("HF_TOKEN (a hub-ci token) is not set")
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/hf-ibproj-test-{uuid.uuid4().hex[:8]}"
    model = make_model("resnet18", 3, 32)
    export_backbone(model, tmp_path / "backbone")
    try:
        push_to_hub(tmp_path / "backbone", repo_id)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()(x)
        assert (loaded - features(model, x)).abs().max() <= 1e-6
    finally:
        api.delete_repo(repo_id, missing_ok=True)
