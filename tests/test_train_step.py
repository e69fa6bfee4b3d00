"""The split training step (gpd_train/train/step.py) run eagerly equals the step it replaced,
bit for bit, and --cuda-graph is refused, saying why, where it cannot run. What GraphStep
captures reads nothing back and draws nothing, and GraphStep itself (warm-up, capture,
replays) trains as the eager step under a CPU emulation of the graph API
(tests/cpu_graphs.py). A real CUDA graph needs a GPU: benchmarks/train_graph.py
(device_check.sh's tiny-train block) compares it with the eager step there.
"""

import json

import pytest
import torch
from builders import micro_run, with_random_stages
from cpu_graphs import emulate_cuda_graphs
from host_syncs import HostSyncs

import gpd_kernels.reference
from gpd_kernels import force_fused_dit_ops, freq_loss
from gpd_model import add_noise, shift_sigma, timestep_from_sigma
from gpd_train.__main__ import main
from gpd_train.config.chains import StageId
from gpd_train.train.builders import build_distill, build_stage0, check_cuda_graph
from gpd_train.train.loop import GRAD_CLIP, OptimizerState
from gpd_train.train.objectives import FlowMatching
from gpd_train.train.pipeline import run_pipeline
from gpd_train.train.step import GraphStep, cuda_graph_refusal


# -- the step as it was before the split (verbatim, CPU: autocast is a no-op there) -------
def old_flow_matching_loss(o, step):
    cond, clean = o.data.draw(o.generator, o.batch_size, with_latents=True)
    context = cond.text
    dropped = torch.rand(o.batch_size, generator=o.generator) < o.cfg_dropout
    context = torch.where(dropped[:, None, None], o.data.negative_context, context)
    sigma = shift_sigma(torch.rand(o.batch_size, generator=o.generator), o.shift)
    noise = torch.randn(clean.shape, generator=o.generator)
    noisy = add_noise(clean, noise, sigma).to(o.device)
    target = (noise - clean).to(o.device)
    pred = o.model(noisy, timestep_from_sigma(sigma.to(o.device)), context.to(o.device))
    return (pred.float() - target).square().mean(), {}


def old_distillation_loss(o, step):
    batch = o._noised_data() if o.lanes is None else o.lanes.current(o._rollout_step)
    u_star = o._target(batch)
    u_student = o._student_velocity(batch)
    mse = (u_student - u_star).square().mean()
    loss = mse
    extras = {"mse": mse.item(), "mean_index": batch.index.float().mean().item()}
    if o.freq_weight > 0:
        freq = freq_loss(u_student, u_star, **o.freq_params)
        loss = loss + o.freq_weight * freq
        extras["freq"] = freq.item()
    if o.lanes is not None:
        velocity = u_star if o.source == "teacher" else u_student.detach()
        o.lanes.advance(o._next_state(batch, velocity), o._rollout_step)
    return loss, extras


def old_train_step(t) -> dict:
    step = t.step + 1
    lr = t.learning_rate(step)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.model.train()
    old_loss = (old_flow_matching_loss if isinstance(t.objective, FlowMatching)
                else old_distillation_loss)
    loss, extras = old_loss(t.objective, step)
    assert torch.isfinite(loss)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in t.model.parameters() if p.requires_grad], GRAD_CLIP)
    t.optimizer.step()
    t.ema.updates += 1
    decay = min(t.ema.decay, (1.0 + t.ema.updates) / (10.0 + t.ema.updates))
    for key, value in t.model_state.state_dict().items():
        t.ema.shadow[key].lerp_(value.float(), 1.0 - decay)
    t.step = step
    return {"stage": t.name, "step": step, "loss": loss.item(), "lr": lr,
            "grad_norm": float(grad_norm), **extras}


def _build(folder, stage, source, iterations=6, **options):
    run = micro_run(folder, **{"distill.state_source": source, "distill.lane_groups": 2,
                               "distill.freq_weight": [0.5, 0.0, 1.0],
                               "stage0.iterations": iterations,
                               "distill.iterations": [iterations] * 3, "checkpoint_every": 100,
                               **options})
    if stage == 0:
        return build_stage0(run)
    with_random_stages(run, "gpd", stage - 1)
    return build_distill(run, StageId("gpd", stage))


@pytest.mark.parametrize("stage,source", [(0, "teacher"), (1, "teacher"), (2, "student"),
                                          (3, "data")])
def test_split_step_run_eagerly_equals_the_old_step_bit_for_bit(tmp_path, stage, source):
    new = _build(tmp_path / "new", stage, source)
    old = _build(tmp_path / "old", stage, source)
    new.run(resume=False)
    expected = [old_train_step(old) for _ in range(old.iterations)]
    got = [{k: v for k, v in record.items() if k != "seconds"} for record in new.metrics.records()]
    assert got == expected  # losses, lr, grad norms, mse/freq/mean_index: exact floats
    if stage == 1:
        assert "freq" in got[0]  # the stage-1 case exercises the frequency term
    for mine, theirs in ((new.model_state, old.model_state), (new.ema, old.ema)):
        theirs = theirs.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.state_dict().items())
    assert new.ema.updates == old.ema.updates == old.iterations
    for p_new, p_old in zip(new.optimizer.param_groups[0]["params"],
                            old.optimizer.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(new.optimizer.state[p_new][key], old.optimizer.state[p_old][key])
    lanes = getattr(new.objective, "lanes", None)
    if lanes is not None:  # the rollout lanes moved on (and restarted) the same way
        assert all(torch.equal(v, old.objective.lanes.pool[k]) for k, v in lanes.pool.items())


def test_refusals_name_the_option():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ok = {"device": cuda, "processes": 1, "streams": 1, "activation_checkpointing": False,
          "lora_stage": None}
    assert cuda_graph_refusal(**ok) is None
    for change, words in (({"device": cpu}, "this run's device is cpu: give --device cuda"),
                          ({"processes": 2}, "not supported under torchrun (2 processes)"),
                          ({"streams": 2}, "2 data streams per process"),
                          ({"activation_checkpointing": True}, "--activation-checkpointing"),
                          ({"lora_stage": "stage1 (rank 4)"}, "LoRA stages (stage1 (rank 4)")):
        assert words in cuda_graph_refusal(**{**ok, **change})
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphStep(forward=None, backward=None, update=None, optimizer=None, device=cpu)


def test_cuda_graph_on_cpu_is_refused_before_anything_trains(tmp_path, capsys):
    code = main(["--stage", "0", "--device", "cpu", "--cuda-graph",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "--cuda-graph captures the training step on a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stage0").exists()
    run = micro_run(tmp_path, cuda_graph=True)
    with pytest.raises(ValueError, match="this run's device is cpu"):
        run_pipeline(run.config, evaluate=False)
    assert not run.stage_folder(StageId("gpd", 0)).exists()


@pytest.mark.parametrize("options,words", [
    ({"distill.lora_rank": 4}, r"LoRA stages \(stage1 \(rank 4\)"),
    ({"parallel.activation_checkpointing": True}, "--activation-checkpointing"),
    ({"parallel.data_streams": 2}, "2 data streams per process")])
def test_cuda_graph_options_it_cannot_capture_are_refused(tmp_path, options, words):
    run = micro_run(tmp_path, cuda_graph=True, **options)
    run.device = torch.device("cuda")  # the refusal reads the configuration only
    with pytest.raises(ValueError, match=words):
        check_cuda_graph(run, StageId("gpd", 1))


def test_a_device_tensor_lr_is_saved_as_the_eager_trainers_float(tmp_path):
    trainer = build_stage0(micro_run(tmp_path))
    trainer.iterations = 1
    trainer.run(resume=False)  # Adam's state exists (DCP would otherwise step to make it)
    for group in trainer.optimizer.param_groups:  # as GraphStep.bind_optimizer leaves it
        group["lr"], group["capturable"] = torch.tensor(1e-3), True
    saved = OptimizerState(trainer.model, trainer.optimizer).state_dict()["param_groups"]
    assert [(g["lr"], g["capturable"]) for g in saved] == [(pytest.approx(1e-3), False)]
    assert all(isinstance(g["lr"], torch.Tensor) for g in trainer.optimizer.param_groups)


def test_the_host_sync_detector_sees_what_a_capture_would_refuse():
    x = torch.randn(4)
    with HostSyncs() as mode:
        x.sum().item()
        bool(x[0] > 0)
        x[x > 0].sum()
        torch.rand(2)
    assert mode.found[:2] == ["_local_scalar_dense", "_local_scalar_dense"]
    assert mode.found[2:] == ["index with a boolean mask", "rand"]


@pytest.mark.parametrize("stage,source", [(0, "teacher"), (1, "teacher"), (2, "student"),
                                          (3, "data")])
@pytest.mark.slow
def test_the_device_part_of_a_step_can_be_captured(tmp_path, monkeypatch, stage, source):
    """What GraphStep captures (the objective's forward, backward with clipping, the EMA
    with a device-tensor weight) reads nothing back to the host and draws no random
    numbers: --cuda-graph's capture would fail on the first and replay stale numbers for
    the second. Checked on the CPU by dispatch, for every objective; the optimizer step
    is AdamW(capturable=True), which only runs on a GPU (benchmarks/train_graph.py)."""
    trainer = _build(tmp_path, stage, source)
    trainer.iterations = 2
    trainer.run(resume=False)  # lazy state (lanes, caches) exists, as after GraphStep's warm-up
    inputs = trainer.objective.prepare(trainer.step + 1)
    assert isinstance(inputs, dict) and all(isinstance(v, torch.Tensor) for v in inputs.values())
    trainer.optimizer.zero_grad(set_to_none=True)
    # As under a capture: data checks that read values back skip themselves.
    monkeypatch.setattr(gpd_kernels.reference, "graph_capturing", lambda tensor: True)
    with HostSyncs() as mode, force_fused_dit_ops():  # the model's CUDA path
        loss, extras, outputs = trainer.objective.forward(inputs)
        grad_norm = trainer._backward(loss)
        trainer.ema.apply(trainer.model_state, torch.tensor(0.01))
    assert mode.found == []
    assert loss.dim() == grad_norm.dim() == 0
    assert all(isinstance(v, torch.Tensor) for v in extras.values())
    trainer.objective.finish(outputs)


@pytest.mark.parametrize("stage,source,form", [(0, "teacher", "fourier_mse"),
                                               (1, "teacher", "fourier_mse"),
                                               (2, "student", "fourier_mse"),
                                               (1, "teacher", "band_amplitude")])
def test_graph_step_emulated_on_cpu_trains_as_the_eager_step(tmp_path, monkeypatch, stage,
                                                             source, form):
    """GraphStep's own logic on the CPU, with torch.cuda's graph API emulated
    (tests/cpu_graphs.py: a capture records the ops and changes nothing; a replay reruns them
    on the same tensors, so Python numbers are baked in and tensors are read afresh): three
    eager warm-up steps, one capture, replays with fresh inputs, learning rate and EMA
    weight. It must train as the eager step does, up to the capturable AdamW's rounding:
    a stale input, a baked learning rate or a lost update would be far off."""
    emulate_cuda_graphs(monkeypatch)
    iterations = 9
    trainers = {}
    for mode in ("eager", "graph"):
        trainers[mode] = trainer = _build(tmp_path / mode, stage, source, iterations,
                                          cuda_graph=mode == "graph", checkpoint_every=4,
                                          **{"distill.freq_form": form})
        trainer.run(resume=False)
    eager, graph = trainers["eager"], trainers["graph"]
    assert eager.graph is None and graph.graph.graph.replays == iterations - 3
    want, got = list(eager.metrics.records()), list(graph.metrics.records())
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert len({r["lr"] for r in got}) == iterations  # the rate moves every step
    for key in ("loss", "grad_norm", *(k for k in want[0] if k in ("mse", "freq"))):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4), key
    for mine, theirs in ((graph.model_state, eager.model_state), (graph.ema, eager.ema)):
        theirs = theirs.state_dict()
        for name, value in mine.state_dict().items():
            torch.testing.assert_close(value, theirs[name], rtol=1e-4, atol=1e-6)
    assert graph.ema.updates == eager.ema.updates == iterations
    lanes = getattr(graph.objective, "lanes", None)
    if lanes is not None:  # the rollout lanes moved on from the replayed outputs alike
        for name, value in lanes.pool.items():
            torch.testing.assert_close(value, eager.objective.lanes.pool[name],
                                       rtol=1e-4, atol=1e-5)


def test_emulated_graph_trainer_resumes_as_if_never_killed(tmp_path, monkeypatch):
    """Killed after a capture, resumed from its checkpoint (the optimizer state rebound to the
    capturable form, a new warm-up and capture): the same losses and weights as a graph run
    that was never interrupted, bit for bit (the emulated replay runs the eager kernels)."""
    emulate_cuda_graphs(monkeypatch)

    def build(folder):
        run = micro_run(folder, cuda_graph=True, checkpoint_every=3,
                        **{"distill.iterations": [11, 4, 4], "distill.lane_groups": 2})
        with_random_stages(run, "gpd", 0)
        return run, build_distill(run, StageId("gpd", 1))

    _, reference = build(tmp_path / "a")
    reference.run(resume=False)
    broken, trainer = build(tmp_path / "b")
    real_prepare = trainer.objective.prepare

    def killed_at_7(step):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")
        return real_prepare(step)

    trainer.objective.prepare = killed_at_7
    with pytest.raises(KeyboardInterrupt):
        trainer.run(resume=False)
    assert trainer.graph.graph is not None and trainer.checkpoints.latest().name == "step-00000006"
    resumed = build_distill(broken, StageId("gpd", 1))
    resumed.run(resume=True)
    assert resumed.graph.graph.replays == 11 - 6 - 3
    assert [r["loss"] for r in resumed.metrics.records()] == [
        r["loss"] for r in reference.metrics.records()]
    for mine, theirs in ((resumed.model_state, reference.model_state),
                         (resumed.ema, reference.ema)):
        theirs = theirs.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.state_dict().items())


@pytest.mark.slow
def test_emulated_graph_pipeline_reports_what_the_eager_one_does(tmp_path, monkeypatch):
    """Every chain (the guided one with its guidance stage) trained with --cuda-graph under
    the emulation, then evaluated: each report row matches the eager pipeline's."""
    emulate_cuda_graphs(monkeypatch)
    reports = {}
    for mode in ("eager", "graph"):
        run = micro_run(tmp_path / mode, cuda_graph=mode == "graph",
                        pipeline_chains=["gpd", "vanilla", "guided"],
                        **{"stage0.iterations": 6, "distill.iterations": [5, 5, 5],
                           "vanilla.iterations": [5, 5, 5], "guided.iterations": [5, 5, 5],
                           "guided.guidance_iterations": 5})
        report = run_pipeline(run.config, evaluate=True)
        reports[mode] = json.loads(report.with_suffix(".json").read_text())["rows"]
    eager, graph = reports["eager"], reports["graph"]
    assert [row["model"] for row in graph] == [row["model"] for row in eager]
    assert any(row["model"].startswith("GPD-w") for row in graph)  # the guided chain
    for got, want in zip(graph, eager, strict=True):
        if want["psnr_db"] is not None:
            assert got["psnr_db"] == pytest.approx(want["psnr_db"], abs=1e-2), got["model"]
