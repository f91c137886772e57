"""Pushes and run checkpoints against a local fake Hub (tests/hub_server.py) on 127.0.0.1, then downloads in a
fresh process where `import hf_ibproj` fails.

The pushes run in this process with huggingface_hub's endpoint patched; the downloads run in a subprocess whose
HF_ENDPOINT points at the fake Hub (huggingface_hub reads it at import), with an empty cache and no token, and
execute the cards' Python snippets verbatim. A test against the Hub's CI endpoint runs only when
HUGGINGFACE_CO_STAGING is set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid

import pytest
import torch
import yaml
from accelerate import Accelerator
from huggingface_hub import HfApi, ModelCard, constants

from hf_ibproj import IBProjModel, export_backbone
from hf_ibproj.cli import main as cli_main
from hf_ibproj.hub import PushError, download_run_checkpoint, push_checkpoint, push_to_hub
from hf_ibproj.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from hf_ibproj.runs import RunFolder
from hub_server import FakeHub
from test_export import features, make_model, make_run_folder, run_without_hf_ibproj, snapshot

TOKEN = "hf_test_secret_XYZ"
BACKBONE_ID = "tester/tiny-resnet"
SMALL_ID = "tester/tiny-small-resnet"
FULL_ID = "tester/tiny-resnet-full"
PIL_COLOR = (128, 64, 32)  # the stand-in image of the card snippets (model_cards/backbone.md)
SMALL_SIZE = 16


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", server.endpoint)
        # derived from the endpoint at import (as HF_ENDPOINT would set it); file downloads are built from it
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain NDJSON commits, which the fake Hub speaks
        patch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """Through the CLI: a stock-resnet18 run pushed as backbone and as full model, and a small-stem export."""
    model = make_model("resnet18", 3, 32)
    run = make_run_folder(tmp_path_factory.mktemp("published"), model)
    export_backbone(run, run / "backbone")
    small = make_model("resnet18_small", 3, SMALL_SIZE, channels=(4, 8, 16, 32))
    small_folder = export_backbone(small, tmp_path_factory.mktemp("small") / "backbone")
    before = snapshot(run)
    assert cli_main(["push", str(run), "--repo-id", BACKBONE_ID, "--private", "--commit-message", "tiny"]) == 0
    assert cli_main(["push", str(run), "--repo-id", FULL_ID, "--full-model"]) == 0
    assert cli_main(["push", str(small_folder), "--repo-id", SMALL_ID]) == 0
    return model, run, before, small


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def _assert_token_in_no_file(hub: FakeHub, *local_folders) -> None:
    for repo in hub.repos.values():
        for revision in repo.branches.values():
            assert not any(TOKEN.encode() in data for data in revision.files.values())
    for folder in local_folders:
        assert not any(TOKEN.encode() in data for data in snapshot(folder).values())


def test_push_uploads_the_export_and_the_token_only_travels_in_the_header(hub, published):
    _, run, before, _ = published
    assert snapshot(run) == before  # nothing local was written, not even the README with the repo id
    uploaded = hub.files(BACKBONE_ID)
    local = snapshot(run / "backbone")
    assert set(uploaded) == set(local) == {"README.md", "config.json", "model.safetensors", "information_plane.png"}
    for name in ("config.json", "model.safetensors", "information_plane.png"):
        assert uploaded[name] == local[name]
    readme = uploaded["README.md"].decode()
    assert f'"hf-hub:{BACKBONE_ID}"' in readme and "<your-username>" not in readme
    assert hub.repos[BACKBONE_ID].private and not hub.repos[FULL_ID].private
    # The full model carries its code; the small-stem backbone its own.
    assert {"modeling_ibproj.py", "configuration_ibproj.py", "model.safetensors"} <= set(hub.files(FULL_ID))
    assert "modeling_small_resnet.py" in hub.files(SMALL_ID)

    writes = [r for r in hub.requests if r.method == "POST" and r.path != "/api/validate-yaml"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)
    _assert_token_in_no_file(hub, run)


_FRESH_DOWNLOADS = """
    import json
    import timm, torch
    from transformers import AutoModel
    backbone_id, small_id, full_id, x_file, small_x_file, snippets_file, out_file = sys.argv[1:]
    x, small_x = torch.load(x_file), torch.load(small_x_file)
    snippets = json.loads(open(snippets_file).read())
    out = {}
    with torch.no_grad():
        out["timm"] = timm.create_model("hf-hub:" + backbone_id, pretrained=True).eval()(x)
        out["auto_model"] = AutoModel.from_pretrained(backbone_id).eval()(x).pooler_output
        out["small_auto_model"] = AutoModel.from_pretrained(small_id, trust_remote_code=True).eval()(
            small_x).pooler_output
    for card in ("backbone", "small"):
        out[card] = []
        for code in snippets[card]:
            namespace = {}
            exec(code, namespace)
            result = namespace.get("features")  # the fine-tuning snippet builds a classifier instead
            out[card].append(result if result is not None else namespace["classifier"].config.num_labels)
        if card == "small":  # the card's timm fine-tuning line: the timm snippet's model + reset_classifier(10)
            namespace = {}
            exec(snippets["small"][0], namespace)
            namespace["model"].reset_classifier(10)
            out["small_timm_head"] = torch.tensor(namespace["model"](torch.zeros(1, *small_x.shape[1:])).shape)

    out["full_loaded"] = AutoModel.from_pretrained(full_id, trust_remote_code=True).state_dict()
    namespace = {}
    exec(snippets["full"][0], namespace)  # the card's continue-pretraining snippet: forward, backward, step
    out["full_type"] = type(namespace["model"]).__module__ + "." + type(namespace["model"]).__name__
    out["full_loss"] = namespace["loss"].detach()
    out["full_stepped"] = namespace["model"].state_dict()
    torch.save(out, out_file)
"""


def _constant_image_features(model: IBProjModel, size: int) -> torch.Tensor:
    """The snippets' stand-in image is constant, so its preprocessing has a closed form: /255, then mean/std."""
    mean, std = torch.tensor(model.config.image_mean), torch.tensor(model.config.image_std)
    pixel = (torch.tensor(PIL_COLOR) / 255.0 - mean) / std
    return features(model, pixel[None, :, None, None].expand(1, 3, size, size))


def test_downloads_without_hf_ibproj_give_identical_features_and_the_card_snippets_run(hub, published, tmp_path):
    model, run, _, small = published
    x, small_x = torch.randn(2, 3, 32, 32), torch.randn(2, 3, SMALL_SIZE, SMALL_SIZE)
    torch.save(x, tmp_path / "x.pt")
    torch.save(small_x, tmp_path / "small_x.pt")
    cards = {"backbone": BACKBONE_ID, "small": SMALL_ID, "full": FULL_ID}
    snippets = {name: _python_blocks(hub.files(repo)["README.md"].decode()) for name, repo in cards.items()}
    assert [len(snippets[name]) for name in cards] == [4, 4, 1]
    small_card = hub.files(SMALL_ID)["README.md"].decode()
    assert "model.reset_classifier(10)" in small_card and "pip install hf_ibproj" not in small_card
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    run_without_hf_ibproj(_FRESH_DOWNLOADS, BACKBONE_ID, SMALL_ID, FULL_ID, tmp_path / "x.pt",
                          tmp_path / "small_x.pt", tmp_path / "snippets.json", tmp_path / "out.pt",
                          cwd=tmp_path, env={**env, "HF_TOKEN": None})  # downloads need no token
    out = torch.load(tmp_path / "out.pt")

    expected = features(model, x)
    assert (out["timm"] - expected).abs().max() <= 1e-6
    assert (out["auto_model"] - expected).abs().max() <= 1e-6
    assert (out["small_auto_model"] - features(small, small_x)).abs().max() <= 1e-6
    # Every card snippet, run verbatim: timm (the small stem through a stock resnet18), transformers, pipeline.
    for card, reference in (("backbone", _constant_image_features(model, 32)),
                            ("small", _constant_image_features(small, SMALL_SIZE))):
        *feature_snippets, finetune_snippet = out[card]
        for snippet_features in feature_snippets:
            assert (snippet_features - reference).abs().max() <= 1e-5, card
        assert finetune_snippet == 10
    assert out["small_timm_head"].tolist() == [1, 10]

    # Full model: loads back exactly with trust_remote_code, and the card's snippet continues pretraining.
    saved = IBProjModel.from_pretrained(run / "model").state_dict()
    assert out["full_type"].startswith("transformers_modules.") and out["full_type"].endswith(".IBProjModel")
    assert set(out["full_loaded"]) == set(saved)
    assert all(torch.equal(out["full_loaded"][k], v) for k, v in saved.items())
    assert torch.isfinite(out["full_loss"])
    changed = [k for k, v in saved.items() if v.is_floating_point() and not torch.equal(out["full_stepped"][k], v)]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert "pip install hf_ibproj" not in hub.files(FULL_ID)["README.md"].decode()


def test_push_keeps_a_readme_edited_on_the_hub_unless_asked(hub, tmp_path, caplog):
    repo_id = "tester/edited-card"
    folder = export_backbone(make_model("resnet18_small", 1, 12, channels=(4, 4, 8, 8)), tmp_path / "backbone")
    assert cli_main(["push", str(folder), "--repo-id", repo_id]) == 0
    card = hub.files(repo_id)["README.md"]
    edited = card.replace(b"## Usage", b"## Notes from the author\n\nHand-written on the Hub.\n\n## Usage")
    HfApi(token=TOKEN).upload_file(path_or_fileobj=edited, path_in_repo="README.md", repo_id=repo_id)

    # Re-export other weights: the push updates them but keeps the README edited on the Hub, and says so.
    folder = export_backbone(make_model("resnet18_small", 1, 12, channels=(4, 4, 8, 8), seed=1), folder)
    with caplog.at_level(logging.WARNING, logger="hf_ibproj.hub"):
        assert cli_main(["push", str(folder), "--repo-id", repo_id]) == 0
    assert hub.files(repo_id)["README.md"] == edited
    assert hub.files(repo_id)["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert "--overwrite-readme" in caplog.text
    caplog.clear()

    assert cli_main(["push", str(folder), "--repo-id", repo_id, "--overwrite-readme"]) == 0
    assert hub.files(repo_id)["README.md"] == card  # the generated card again
    with caplog.at_level(logging.WARNING, logger="hf_ibproj.hub"):
        assert cli_main(["push", str(folder), "--repo-id", repo_id]) == 0  # the same card: nothing to keep
    assert "--overwrite-readme" not in caplog.text


def test_invalid_repo_id_is_rejected_before_any_request(hub, published, capsys):
    _, run, before, _ = published
    requests = len(hub.requests)
    assert cli_main(["push", str(run), "--repo-id", "not a/valid repo/id"]) == 2
    assert "invalid Hub repository id" in capsys.readouterr().err
    assert len(hub.requests) == requests and snapshot(run) == before


def test_source_without_model_is_rejected_before_any_request(hub, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing here")
    requests = len(hub.requests)
    assert cli_main(["push", str(tmp_path), "--repo-id", "tester/empty"]) == 2
    assert "no IBProjModel" in capsys.readouterr().err
    assert len(hub.requests) == requests and snapshot(tmp_path) == {"notes.txt": b"nothing here"}


def test_server_error_during_commit_is_clear_and_leaves_folders_unchanged(hub, tmp_path, capsys):
    run = make_run_folder(tmp_path, make_model("resnet18_small", 1, 12, channels=(4, 4, 8, 8)))
    before = snapshot(run)  # no backbone/: push exports it to staging
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


# --------------------------------------------------------------------------------------------------------------
# Run checkpoints on the Hub
# --------------------------------------------------------------------------------------------------------------
class TinyRun:
    """A run folder with real checkpoints (checkpoints.save_checkpoint) of a tiny model and optimizer."""

    def __init__(self, run_dir):
        self.dir = run_dir
        self.dir.mkdir(parents=True)
        torch.manual_seed(0)
        self.accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(6, 3)
        self.model, self.optimizer = self.accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        (self.dir / "config.yaml").write_text(yaml.safe_dump({"dataset": "fashion_mnist", "epochs": 2}))
        (self.dir / "run_info.json").write_text(json.dumps({"hardware": "2 CPU cores"}))
        (self.dir / "random_init_eval.json").write_text(json.dumps({"linear_top1": 10.0, "knn_top1": 10.0}))
        self.step = 0

    def train_and_checkpoint(self, steps: int):
        for _ in range(steps):
            self.step += 1
            loss = self.model(torch.randn(4, 6)).square().mean()
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()
            with (self.dir / "metrics.jsonl").open("a") as log:
                log.write(json.dumps({"step": self.step, "loss": loss.item()}) + "\n")
        return save_checkpoint(self.accelerator, self.dir, self.step, keep=1)


def test_checkpoints_pushed_during_a_run_resume_on_another_machine(hub, tmp_path):
    repo_id = "tester/run-checkpoints"
    run = TinyRun(tmp_path / "run")
    first = run.train_and_checkpoint(12)
    (first / "random_states_1.pkl").write_bytes(b"a second process's RNG state")  # only in the first checkpoint
    before = snapshot(run.dir)
    push_checkpoint(run.dir, first, repo_id, private=True)
    assert snapshot(run.dir) == before
    files = hub.files(repo_id)
    assert {name for name in files if name.startswith("last-checkpoint/")} == {
        f"last-checkpoint/{name}" for name in snapshot(first)}
    assert json.loads(files["last_checkpoint.json"]) == {"name": "step_00000012", "step": 12}
    assert hub.repos[repo_id].private

    # The next checkpoint replaces last-checkpoint/ entirely and refreshes the records.
    second = run.train_and_checkpoint(12)
    assert not first.exists() and second.name == "step_00000024"
    push_checkpoint(run.dir, second, repo_id)
    files = hub.files(repo_id)
    assert {name for name in files if name.startswith("last-checkpoint/")} == {
        f"last-checkpoint/{name}" for name in snapshot(second)}
    assert json.loads(files["last_checkpoint.json"]) == {"name": "step_00000024", "step": 24}
    assert all(files[name] == (run.dir / name).read_bytes() for name in RunFolder.RECORDS)
    _assert_token_in_no_file(hub, run.dir)

    # Another machine: an empty --output-dir gets the records and the checkpoint under its own name.
    elsewhere = tmp_path / "elsewhere" / "run"
    restored = download_run_checkpoint(repo_id, elsewhere)
    assert restored == elsewhere / "checkpoints" / "step_00000024" == latest_checkpoint(elsewhere)
    assert snapshot(restored) == snapshot(second)
    assert all((elsewhere / name).read_bytes() == (run.dir / name).read_bytes() for name in RunFolder.RECORDS)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["checkpoints", *sorted(RunFolder.RECORDS)]  # nothing staged
    # It restores the training state: the model's weights at step 24.
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    with torch.no_grad():
        for parameter in run.model.parameters():
            parameter.zero_()
    assert load_checkpoint(run.accelerator, elsewhere)[0] == restored
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in trained.items())

    with pytest.raises(FileExistsError, match="already holds checkpoint step_00000024"):
        download_run_checkpoint(repo_id, elsewhere)


def test_checkpoint_download_errors_name_the_problem(hub, published, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.*--hub-strategy checkpoint"):
        download_run_checkpoint(BACKBONE_ID, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download_run_checkpoint("tester/never-created", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_failed_checkpoint_pushes_raise_push_error_and_change_nothing(hub, tmp_path, monkeypatch):
    run = TinyRun(tmp_path / "run")
    checkpoint = run.train_and_checkpoint(2)
    before = snapshot(run.dir)
    hub.fail_commits = True
    try:
        with pytest.raises(PushError, match="tester/failing.*500"):
            push_checkpoint(run.dir, checkpoint, "tester/failing")
    finally:
        hub.fail_commits = False
    with pytest.raises(PushError, match="not a checkpoint folder"):
        push_checkpoint(run.dir, run.dir / "checkpoints" / "step_00000099", "tester/failing")
    with pytest.raises(PushError, match="invalid Hub repository id"):
        push_checkpoint(run.dir, checkpoint, "not a valid id")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    with pytest.raises(PushError, match="127.0.0.1:9"):
        push_checkpoint(run.dir, checkpoint, "tester/failing")
    with pytest.raises(PushError):
        push_to_hub(export_backbone(make_model("resnet18_small", 1, 12, channels=(4, 4, 8, 8)), tmp_path / "b"),
                    "tester/failing")
    assert snapshot(run.dir) == before
    assert not any("failing" in repo and hub.files(repo) for repo in hub.repos)


@pytest.mark.skipif(not os.environ.get("HUGGINGFACE_CO_STAGING"), reason="needs the Hub's CI endpoint")
def test_push_and_load_on_hub_ci(tmp_path):
    """Against hub-ci.huggingface.co (huggingface_hub's staging switch); HF_TOKEN must be a hub-ci token."""
    import timm

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
            loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
        assert (loaded(x) - features(model, x)).abs().max() <= 1e-6
        assert ModelCard.load(repo_id).data.library_name == "timm"
    finally:
        api.delete_repo(repo_id, missing_ok=True)
