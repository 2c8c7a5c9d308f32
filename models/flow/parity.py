"""Parity of the flow decoder against the reference fixtures in `<golden>/flow/`.

The model is built from the fixture folder's own `config.yaml` (any size) and its `flow.pt` is
loaded strictly. Checked: encoder input/output, `encoder_proj`, speaker projection, mu, cond,
mask, the seed-42 noise (bit-exact), the time grid, the mel of both cases (saved noise injected),
the ODE trajectory and the stand-alone estimator calls.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from models.flow.cfm import EulerTrace, reference_noise, time_grid
from models.flow.model import FlowDecoder
from models.parity import ParityResult, compare, load_npy

__all__ = ["check", "flow_fixture_dir"]

logger = logging.getLogger(__name__)

COMPONENT = "flow"
ENCODER_TOL = 1e-5
ESTIMATOR_TOL = 1e-4
MEL_TOL = 1e-4
ESTIMATOR_INPUTS = ("x", "mask", "mu", "t", "spks", "cond")


def flow_fixture_dir(golden_dir: Path) -> Path:
    """`golden_dir/flow` when present, else `golden_dir` itself (a flow fixture folder)."""
    sub = Path(golden_dir) / "flow"
    return sub if sub.is_dir() else Path(golden_dir)


def _tensor(folder: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(load_npy(folder, name))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy()


def _check_case(
    model: FlowDecoder, folder: Path, case: str, t_values: list[float]
) -> list[ParityResult]:
    token = _tensor(folder, f"{case}_token")
    if (folder / f"{case}_prompt_token.npy").is_file():
        prompt_token = _tensor(folder, f"{case}_prompt_token")
        prompt_feat = _tensor(folder, f"{case}_prompt_feat")
        embedding = _tensor(folder, f"{case}_embedding")
    else:
        prompt_token = torch.zeros(1, 0, dtype=torch.long)
        prompt_feat = torch.zeros(1, 0, model.cfg.output_size)
        embedding = torch.zeros(1, model.cfg.spk_embed_dim)
    results: list[ParityResult] = []

    def add(name: str, got: torch.Tensor | np.ndarray, tol: float) -> None:
        got = _np(got) if isinstance(got, torch.Tensor) else got
        results.append(
            compare(COMPONENT, f"{case}/{name}", got, load_npy(folder, f"{case}_{name}"), tol)
        )

    tokens = torch.cat([prompt_token, token], dim=1)
    lengths = torch.tensor([tokens.shape[1]])
    with torch.no_grad():
        enc_in = model.embed_tokens(tokens, lengths)
        enc_out, _ = model.encoder(enc_in, lengths)
        add("enc_in", enc_in, ENCODER_TOL)
        add("enc_out", enc_out, ENCODER_TOL)
        add("enc_proj_out", model.encoder_proj(enc_out), ENCODER_TOL)
    inputs = model.prepare(token, prompt_token, prompt_feat, embedding)
    for name in ("mu", "mask", "spks", "cond"):
        add(name, getattr(inputs, name), ENCODER_TOL)
    own_noise = reference_noise(tuple(inputs.mu.shape), inputs.mu.device, inputs.mu.dtype)
    add("noise", own_noise, 0.0)
    add(
        "t_span",
        time_grid(10, model.cfg.decoder.t_scheduler, torch.device("cpu"), torch.float32),
        0.0,
    )

    saved_noise = _tensor(folder, f"{case}_noise")
    trace = EulerTrace(states=[], times=[])
    mel = model.inference(
        token, prompt_token, prompt_feat, embedding, noise=saved_noise, trace=trace
    )
    add("mel", mel, MEL_TOL)
    results.append(
        compare(
            COMPONENT,
            f"{case}/t_values",
            np.array([float(t) for t in trace.times]),
            np.array(t_values),
            1e-7,
        )
    )
    if (folder / f"{case}_x_trajectory.npy").is_file():
        add("x_trajectory", torch.cat(trace.states, dim=0), MEL_TOL)
    return results


def _estimator_call(model: FlowDecoder, folder: Path, prefix: str) -> torch.Tensor:
    args = {name: _tensor(folder, f"{prefix}_{name}") for name in ESTIMATOR_INPUTS}
    if args["x"].shape[0] == 1:
        args["t"] = args["t"].reshape(())  # the sampler feeds a 0-dim time
    with torch.no_grad():
        return model.estimator(**args)


def _check_estimator(model: FlowDecoder, folder: Path) -> list[ParityResult]:
    results = []
    for prefix in ("estimator_step0_cond", "estimator_step0_uncond", "estimator_batch2"):
        got = _np(_estimator_call(model, folder, prefix))
        results.append(
            compare(
                COMPONENT, f"{prefix}/out", got, load_npy(folder, f"{prefix}_out"), ESTIMATOR_TOL
            )
        )
    cond = {name: _tensor(folder, f"estimator_step0_cond_{name}") for name in ESTIMATOR_INPUTS}
    with torch.no_grad():
        velocity = model.decoder.guided_velocity(
            cond["x"], cond["mask"], cond["mu"], cond["t"].reshape(()), cond["spks"], cond["cond"]
        )
    expected = load_npy(folder, "estimator_step0_cfg_velocity")
    results.append(
        compare(
            COMPONENT,
            "estimator_step0/cfg_velocity (batched)",
            _np(velocity),
            expected,
            ESTIMATOR_TOL,
        )
    )
    return results


def check(golden_dir: Path) -> list[ParityResult]:
    """Run every flow parity comparison; `golden_dir` is the fixture root or its `flow/` folder."""
    folder = flow_fixture_dir(Path(golden_dir))
    model = FlowDecoder.from_pretrained(folder)
    info = json.loads((folder / "run_info.json").read_text(encoding="utf-8"))
    results: list[ParityResult] = []
    for case in ("caseA", "caseB"):
        results += _check_case(model, folder, case, info["cases"][case]["t_values"])
    results += _check_estimator(model, folder)
    failed = [r.output for r in results if not r.passed]
    logger.info("flow parity: %d checks, %d failed %s", len(results), len(failed), failed)
    return results
