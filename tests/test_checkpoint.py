"""Training checkpoints: DCP through iopath (a registered URI prefix), completeness, and a bit-identical resume
of the 2-rank DLRM job."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from iopath.common.file_io import NativePathHandler, PathManager
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper

from helpers import make_kjt, random_bags, spawn_ranks
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.checkpoint import (
    MANIFEST,
    Progress,
    agreed_latest_checkpoint,
    checkpoint_path,
    complete_checkpoints,
    latest_checkpoint,
    load_training_state,
    save_training_state,
    training_state,
    verify_checkpoint,
)


class ScratchHandler(NativePathHandler):
    """``scratch://<rel>`` -> ``<root>/<rel>``: a URI scheme only iopath knows about."""

    PREFIX = "scratch://"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def _get_supported_prefixes(self) -> list[str]:
        return [self.PREFIX]

    def _get_path_with_cwd(self, path: str) -> str:
        return str(self.root / path[len(self.PREFIX):]) if path.startswith(self.PREFIX) else path

    def _mkdirs(self, path: str, **kwargs: object) -> None:
        super()._mkdirs(self._get_path_with_cwd(path), **kwargs)

    def _rm(self, path: str, **kwargs: object) -> None:
        super()._rm(self._get_path_with_cwd(path), **kwargs)


def scratch_manager(root: Path) -> PathManager:
    manager = PathManager()
    manager.register_handler(ScratchHandler(root))
    return manager


def build(seed: int) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=500, feature_names=["f1"]),
              EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=20, feature_names=["f2"])]
    module = CompressedEmbeddingBagCollection(tables, {"big": RobeConfig(compression=10, chunk_size=4, seed=seed)})
    apply_optimizer_in_backward(torch.optim.Adagrad, module.parameters(), {"lr": 0.1})
    return module


def train_step(module: CompressedEmbeddingBagCollection, step: int) -> torch.Tensor:
    rng = random.Random(step)
    kjt = make_kjt({"f1": random_bags(rng, 500, 6, 3), "f2": random_bags(rng, 20, 6, 3)})
    out = module(kjt).values()
    out.pow(2).sum().backward()
    return out.detach()


def test_round_trip_through_an_iopath_uri_restores_model_and_fused_optimizer(tmp_path: Path) -> None:
    manager = scratch_manager(tmp_path)
    trained = build(seed=0)
    for step in range(3):
        train_step(trained, step)
    path = save_training_state("scratch://ckpt", 3, trained, {"fused": trained.fused_optimizer}, manager,
                               data_position=7)
    assert path == "scratch://ckpt/step_00000003" and (tmp_path / "ckpt" / "step_00000003" / ".metadata").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000003"]  # no staging left behind
    assert latest_checkpoint("scratch://ckpt", manager) == (3, path)

    restored = build(seed=0)
    train_step(restored, 99)  # different weights and accumulators before loading
    assert load_training_state(path, restored, {"fused": restored.fused_optimizer}, manager) == Progress(3, 7)
    for key, value in trained.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored.state_dict()[key], value), key
    expected, got = trained.fused_optimizer.state_dict()["state"], restored.fused_optimizer.state_dict()["state"]
    assert expected.keys() == got.keys()
    for key in expected:
        for name, value in expected[key].items():
            assert torch.equal(torch.as_tensor(got[key][name]), torch.as_tensor(value)), (key, name)
    for step in range(3, 5):  # training goes on identically
        assert torch.equal(train_step(restored, step), train_step(trained, step))


def test_loading_into_another_hash_seed_is_refused(tmp_path: Path) -> None:
    manager = scratch_manager(tmp_path)
    path = save_training_state("scratch://c", 1, build(seed=0), {}, manager)
    with pytest.raises(ValueError, match="seed"):
        load_training_state(path, build(seed=1), {}, manager)


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    module = build(seed=0)
    root = str(tmp_path / "run")
    assert latest_checkpoint(root) is None
    save_training_state(root, 5, module, {})
    (tmp_path / "run" / "step_00000010.partial-0123456789ab").mkdir()  # as if killed while saving step 10
    (tmp_path / "run" / "step_00000020").mkdir()  # no manifest
    (tmp_path / "run" / "notes").mkdir()
    assert complete_checkpoints(root) == [(5, checkpoint_path(root, 5))]
    assert latest_checkpoint(root) == (5, checkpoint_path(root, 5))


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_manifest(path: Path) -> None:
    (path.parent / MANIFEST).write_text('{"files": ')


@pytest.mark.parametrize("damage, reason", [(damage_truncate, "truncated"), (damage_flip_a_byte, "corrupt"),
                                            (damage_manifest, "unreadable"), (Path.unlink, "missing")])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path, damage, reason: str) -> None:
    module = build(seed=0)
    root = str(tmp_path / "run")
    save_training_state(root, 5, module, {})
    train_step(module, 0)
    save_training_state(root, 10, module, {})
    data_files = [p for p in Path(checkpoint_path(root, 10)).iterdir() if p.suffix == ".distcp"]
    damage(data_files[0])
    assert verify_checkpoint(checkpoint_path(root, 5)) is None and reason in verify_checkpoint(checkpoint_path(root, 10))
    with pytest.warns(UserWarning, match=rf"step_00000010 is not usable .*{reason}"):
        assert latest_checkpoint(root) == (5, checkpoint_path(root, 5))
    restored = build(seed=0)
    assert load_training_state(checkpoint_path(root, 5), restored, {}).step == 5


def test_the_global_batch_is_saved_and_older_checkpoints_without_it_load(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    module = build(seed=0)
    path = save_training_state(str(tmp_path / "new"), 4, module, {}, global_batch=96)
    assert load_training_state(path, build(seed=0), {}) == Progress(4, 4, 96)
    saving = training_state._training_state

    def without_global_batch(*args: object) -> dict:
        state = saving(*args)
        del state["progress"]["global_batch"]
        return state

    monkeypatch.setattr(training_state, "_training_state", without_global_batch)
    older = save_training_state(str(tmp_path / "old"), 4, module, {}, global_batch=96)
    monkeypatch.setattr(training_state, "_training_state", saving)
    assert "progress.global_batch" not in FileSystemReader(older).read_metadata().state_dict_metadata
    assert load_training_state(older, build(seed=0), {}) == Progress(4, 4, 0)


def test_saving_a_step_again_replaces_it_whole(tmp_path: Path) -> None:
    module = build(seed=0)
    root = str(tmp_path / "run")
    save_training_state(root, 5, module, {})
    train_step(module, 0)
    save_training_state(root, 5, module, {})
    restored = build(seed=0)
    load_training_state(latest_checkpoint(root)[1], restored, {})
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "run").iterdir()) == ["step_00000005",
                                                                                  "step_00000005.replaced"]
    assert torch.equal(restored.pss_memories["robe_default"].weight, module.pss_memories["robe_default"].weight)


STEPS, EVERY = 24, 3
PSS = ["--pss", "robe:compression=50,chunk_size=8,min_rows=10000"]


def job(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "torchrec_pss.app.dlrm_main", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--batch-size", "64", "--eval-batches", "1", *PSS, *args]


JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> None:
    run = subprocess.run(job(*args), capture_output=True, text=True, timeout=600, env=JOB_ENV)
    assert run.returncode == 0, run.stderr[-4000:]


def flat_checkpoint(path: str, tmp_path: Path, name: str) -> dict:
    dcp_to_torch_save(path, tmp_path / name)
    return torch.load(tmp_path / name, weights_only=False)


def test_job_killed_mid_run_resumes_to_bit_identical_parameters(tmp_path: Path) -> None:
    """A 2-rank job SIGKILLed (launcher and workers) after its second checkpoint, then restarted, ends with
    the same parameters and optimizer states as an uninterrupted job (sharded TorchRec tables, replicated
    ROBE memories, fused and dense Adagrad)."""
    torchrun("--checkpoint-dir", str(tmp_path / "straight"))
    killed = str(tmp_path / "killed")
    process = subprocess.Popen(job("--checkpoint-dir", killed), env=JOB_ENV, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not any(step >= 2 * EVERY for step, _ in complete_checkpoints(killed)):
        assert process.poll() is None, f"the job ended before it could be killed: {process.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, "no second checkpoint within 10 minutes"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert latest_checkpoint(killed)[0] < STEPS, "the job was killed before its end"

    torchrun("--checkpoint-dir", killed, "--summary", str(tmp_path / "s.json"))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert 2 * EVERY <= summary["resumed_from_step"] < STEPS
    straight = flat_checkpoint(checkpoint_path(str(tmp_path / "straight"), STEPS), tmp_path, "a.pt")
    resumed = flat_checkpoint(checkpoint_path(killed, STEPS), tmp_path, "b.pt")
    early = flat_checkpoint(checkpoint_path(killed, summary["resumed_from_step"]), tmp_path, "c.pt")
    tensors = [key for key, value in straight.items() if isinstance(value, torch.Tensor)]
    assert any("pss_memories" in key for key in tensors) and any("embedding_bags" in key for key in tensors)
    assert any(key.startswith("optimizers.fused") for key in tensors)
    assert any(key.startswith("optimizers.dense") for key in tensors)
    assert straight.keys() == resumed.keys()
    for key in tensors:
        assert torch.equal(straight[key], resumed[key]), key
    assert any(not torch.equal(straight[key], early[key]) for key in tensors if key.startswith("model."))
    assert early["progress.data_position"] == summary["resumed_from_step"]


def test_a_file_uri_is_the_local_path_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = build(seed=0)
    root = tmp_path / "uri run"
    uri = "file://" + urllib.parse.quote(str(root))
    path = save_training_state(uri, 2, module, {})
    assert path == str(root / "step_00000002") and (root / "step_00000002" / MANIFEST).is_file()
    assert not (tmp_path / "file:").exists()
    assert latest_checkpoint(uri) == (2, path) == latest_checkpoint(f"file://localhost{root}")
    assert load_training_state(uri + "/step_00000002", build(seed=0), {}).step == 2
    with pytest.raises(ValueError, match="not host 'relative'"):
        save_training_state("file://relative/run", 2, module, {})


def test_a_save_killed_between_its_renames_keeps_the_older_copy_of_the_step(tmp_path: Path) -> None:
    class FailingFinalRename(PathManager):
        failing = False

        def mv(self, src: str, dst: str, **kwargs: object) -> bool:
            final = self.failing and ".partial-" in src and dst.endswith("/step_00000005")
            return False if final else super().mv(src, dst, **kwargs)

    manager = FailingFinalRename()
    module = build(seed=0)
    root = str(tmp_path / "run")
    save_training_state(root, 5, module, {}, manager)
    saved = module.pss_memories["robe_default"].weight.detach().clone()
    train_step(module, 0)
    manager.failing = True
    with pytest.raises(OSError, match="could not rename"):
        save_training_state(root, 5, module, {}, manager)
    assert not (tmp_path / "run" / "step_00000005").exists()
    step, path = latest_checkpoint(root)
    assert step == 5 and ".replaced-" in path
    restored = build(seed=0)
    assert load_training_state(path, restored, {}).step == 5
    assert torch.equal(restored.pss_memories["robe_default"].weight, saved)


def test_a_step_saved_whole_is_preferred_to_its_older_copy(tmp_path: Path) -> None:
    module = build(seed=0)
    root = str(tmp_path / "run")
    save_training_state(root, 5, module, {})
    save_training_state(root, 5, module, {})
    paths = [path for _, path in complete_checkpoints(root)]
    assert ".replaced-" in paths[0] and paths[1] == checkpoint_path(root, 5)
    assert latest_checkpoint(root) == (5, checkpoint_path(root, 5))


def _failing_manifest_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 0:
        def disk_full(*args: object) -> None:
            raise OSError(28, "No space left on device")
        training_state._write_manifest = disk_full
    try:
        save_training_state(os.path.join(out_dir, "run"), 1, build(seed=0), {})
        outcome = "returned"
    except OSError as error:
        outcome = str(error)
    dist.barrier()
    torch.save(outcome, os.path.join(out_dir, f"outcome{rank}.pt"))
    dist.destroy_process_group()


def test_a_failure_of_the_first_rank_is_raised_on_every_rank() -> None:
    first, second = spawn_ranks(_failing_manifest_worker, 2, "outcome")
    assert "No space left on device" in first
    assert "failed on rank 0" in second and "No space left on device" in second


@pytest.mark.parametrize("saved_with, loaded_with, entry", [
    (lambda p: torch.optim.Adagrad(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1), "sum"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1), "momentum_buffer"),
    (lambda p: torch.optim.Adam(p, amsgrad=True), lambda p: torch.optim.Adam(p), "max_exp_avg_sq"),
])
def test_a_keyed_dense_optimizer_refuses_state_it_would_not_load(tmp_path: Path, saved_with, loaded_with,
                                                                 entry: str) -> None:
    def dense(module: nn.Module, make) -> KeyedOptimizerWrapper:
        return KeyedOptimizerWrapper({"head.weight": module.weight}, make)

    head = nn.Linear(3, 1, bias=False)
    optimizer = dense(head, saved_with)
    head(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    path = save_training_state(str(tmp_path / "run"), 1, head, {"dense": optimizer})
    other = nn.Linear(3, 1, bias=False)
    before = other.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"unexpected .*head\.weight\.{entry}"):
        load_training_state(path, other, {"dense": dense(other, loaded_with)})
    assert torch.equal(other.weight, before)


def test_tensors_of_another_shape_or_dtype_are_refused_naming_them(tmp_path: Path) -> None:
    path = save_training_state(str(tmp_path / "run"), 1, build(seed=0), {})
    smaller = CompressedEmbeddingBagCollection(
        [EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=500, feature_names=["f1"]),
         EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=20, feature_names=["f2"])],
        {"big": RobeConfig(compression=20, chunk_size=4, seed=0)})
    with pytest.raises(ValueError, match=r"pss_memories\.robe_default\.weight: saved \[400\] torch.float32, here "
                                         r"\[200\] torch.float32"):
        load_training_state(path, smaller, {})
    half = CompressedEmbeddingBagCollection(
        [EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=500, feature_names=["f1"]),
         EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=20, feature_names=["f2"],
                            data_type=DataType.FP16)],
        {"big": RobeConfig(compression=10, chunk_size=4, seed=0)})
    before = half.embedding_bags["small"].weight.detach().clone()
    with pytest.raises(ValueError, match=r"embedding_bags\.small\.weight: saved \[20, 8\] torch.float32, here "
                                         r"\[20, 8\] torch.float16"):
        load_training_state(path, half, {})
    assert torch.equal(half.embedding_bags["small"].weight, before)


def _agreed_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    root = os.path.join(out_dir, "run")
    save_training_state(root, 3, build(seed=0), {})
    if rank == 1:
        def unreadable(*args: object) -> None:
            raise OSError("this rank cannot read the checkpoint")
        training_state.latest_checkpoint = unreadable
    torch.save(agreed_latest_checkpoint(root), os.path.join(out_dir, f"found{rank}.pt"))
    dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_the_first_rank_found() -> None:
    first, second = spawn_ranks(_agreed_worker, 2, "found")
    assert first == second and first[0] == 3 and first[1].endswith("step_00000003")
