"""HiFT vocoder: reference parity, checkpoint format, config parsing and cache semantics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.hift import (
    HiFTConfig,
    HiFTGenerator,
    HyperNode,
    HyperYamlError,
    SourceDraws,
    parse_hyperyaml,
)
from models.hift.parity import check
from models.hift.tiny import tiny_hift_yaml_section, write_tiny_hift

N_FRAMES = 12  # tiny mel inputs keep each call well under a second on CPU


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_hift")
    write_tiny_hift(out, seed=0)
    (out / "config.yaml").write_text("sample_rate: 22050\n" + tiny_hift_yaml_section())
    return out


@pytest.fixture(scope="module")
def tiny_hift(tiny_dir: Path) -> HiFTGenerator:
    return HiFTGenerator.from_pretrained(tiny_dir)


def _mel(n_frames: int = N_FRAMES, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 80, n_frames, generator=torch.Generator().manual_seed(seed)) - 4.0


def test_hift_matches_reference_fixtures(golden_dir: Path) -> None:
    results = check(golden_dir)
    failed = [r.line() for r in results if not r.passed]
    assert results and not failed, "\n".join(failed)


def test_model_keys_and_shapes_equal_official_checkpoint_list(golden_dir: Path) -> None:
    """Built from the official (full-size) config, the state dict has exactly the 227 keys and
    shapes listed for the real hift.pt, including weight_g/weight_v and their shapes."""
    config = HiFTConfig.from_yaml(golden_dir / "flow" / "config_official_mirror.yaml")
    with torch.device("meta"):
        model = HiFTGenerator(config)
    listed = {}
    for line in (
        (golden_dir / "hift" / "state_dict_keys_real_inferred.txt").read_text().splitlines()
    ):
        name, shape, _ = line.split("\t")
        listed[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == listed


def test_official_config_values_are_read(golden_dir: Path) -> None:
    config = HiFTConfig.from_yaml(golden_dir / "flow" / "config_official_mirror.yaml")
    assert config.base_channels == 512
    assert config.f0_predictor.cond_channels == 512
    assert config.sampling_rate == 22050  # through !ref <sample_rate>
    assert (config.istft_n_fft, config.istft_hop_len) == (16, 4)
    assert config.upsample_factor == 256


def test_unknown_hift_key_is_rejected() -> None:
    text = "sample_rate: 22050\n" + tiny_hift_yaml_section() + "    surprise_knob: 3\n"
    with pytest.raises(HyperYamlError, match="surprise_knob"):
        HiFTConfig.from_section(parse_hyperyaml(text)["hift"])


def test_yaml_tags_are_never_executed() -> None:
    data = parse_hyperyaml("x: !apply:os.system ['false']\ny: !name:builtins.exec\n")
    assert data["x"] == HyperNode("apply", "os.system", args=["false"])
    assert data["y"].target == "builtins.exec"


def test_unresolvable_ref_names_the_key() -> None:
    with pytest.raises(HyperYamlError, match="missing_key"):
        parse_hyperyaml("a: !ref <missing_key>\n")


@pytest.mark.parametrize(
    ("edit", "error", "needle"),
    [
        (lambda sd: sd.pop("conv_pre.weight_g"), KeyError, "conv_pre.weight_g"),
        (lambda sd: sd.__setitem__("conv_pre.weight", torch.zeros(1)), KeyError, "conv_pre.weight"),
        (lambda sd: sd.__setitem__("conv_post.bias", torch.zeros(3)), ValueError, "conv_post.bias"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_strict_load_errors_name_file_and_key(
    tiny_dir: Path, tmp_path: Path, edit, error: type, needle: str
) -> None:
    state = torch.load(tiny_dir / "hift.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "hift.pt")
    (tmp_path / "config.yaml").write_text((tiny_dir / "config.yaml").read_text())
    with pytest.raises(error) as excinfo:
        HiFTGenerator.from_pretrained(tmp_path)
    assert needle in str(excinfo.value) and "hift.pt" in str(excinfo.value)


def test_tiny_model_runs_on_cpu_within_audio_limit(tiny_hift: HiFTGenerator) -> None:
    speech, source = tiny_hift.inference(_mel(), generator=torch.Generator().manual_seed(1))
    n = N_FRAMES * 256
    assert speech.shape == (1, n) and source.shape == (1, 1, n)
    assert torch.isfinite(speech).all()
    assert speech.abs().max() <= tiny_hift.config.audio_limit
    assert speech.std() > 1e-3  # not silent


def test_cache_source_overwrites_only_the_source_prefix(tiny_hift: HiFTGenerator) -> None:
    mel = _mel()
    draws = tiny_hift.draw(1, N_FRAMES * 256, torch.Generator().manual_seed(2))
    cache = torch.linspace(-0.5, 0.5, 256).view(1, 1, 256)
    _, plain = tiny_hift.inference(mel, None, draws=draws)
    _, cached = tiny_hift.inference(mel, cache, draws=draws)
    torch.testing.assert_close(cached[:, :, :256], cache, rtol=0, atol=0)
    torch.testing.assert_close(cached[:, :, 256:], plain[:, :, 256:], rtol=0, atol=0)


def test_seeded_generator_replays_the_same_audio(tiny_hift: HiFTGenerator) -> None:
    mel = _mel()
    first = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(5))[0]
    again = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(5))[0]
    other = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(6))[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_draws_follow_reference_order() -> None:
    """Phases come first (Uniform(-pi, pi), harmonic 0 forced to 0), then the unit noise."""
    draws = SourceDraws.sample(1, 9, 64, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    phases = -torch.pi + torch.rand((1, 9, 1), generator=replay) * (2 * torch.pi)
    noise = torch.randn((1, 9, 64), generator=replay)
    assert draws.phases[0, 0, 0] == 0
    torch.testing.assert_close(draws.phases[:, 1:], phases[:, 1:])
    torch.testing.assert_close(draws.sine_noise, noise, rtol=0, atol=0)


def test_reduced_precision_keeps_source_in_float32(tiny_dir: Path) -> None:
    model = HiFTGenerator.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    speech, source = model.inference(_mel(), generator=torch.Generator().manual_seed(1))
    assert source.dtype == torch.float32 and torch.isfinite(speech).all()


def test_source_phase_continues_across_chunks(tiny_hift: HiFTGenerator) -> None:
    """Rendering the source in two chunks, the second starting at the phase reached by the
    first (`cycles_after`), equals rendering it in one go (noise off)."""
    f0 = torch.linspace(80.0, 220.0, 10)[None, :]
    n1, hop = 4, tiny_hift.config.upsample_factor
    phases = tiny_hift.draw(1, 0, torch.Generator().manual_seed(4)).phases

    def silent(length: int) -> SourceDraws:
        return SourceDraws(phases, torch.zeros(1, phases.shape[1], length))

    whole = tiny_hift.source_from_f0(f0, silent(10 * hop))
    first = tiny_hift.source_from_f0(f0[:, :n1], silent(n1 * hop))
    start = tiny_hift.cycles_after(f0[:, :n1])
    second = tiny_hift.source_from_f0(f0[:, n1:], silent((10 - n1) * hop), start)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), whole, rtol=0, atol=2e-4)


def test_config_rejects_inconsistent_stage_lists() -> None:
    with pytest.raises(ValueError, match="source resblock"):
        HiFTConfig(source_resblock_kernel_sizes=(7,))
    with pytest.raises(ValueError, match="upsample"):
        HiFTConfig(upsample_kernel_sizes=(16,))


@pytest.mark.parametrize(("batch", "n_frames"), [(1, N_FRAMES), (3, 5)])
def test_unchecked_istft_and_decode_give_torch_istfts_numbers(
    tiny_hift: HiFTGenerator, batch: int, n_frames: int
) -> None:
    """The overlap-add without torch.istft's host-side check (what a CUDA graph can record)
    computes the same numbers, bit for bit."""
    gen = torch.Generator().manual_seed(batch)
    conv_post_out = 2 * torch.randn(
        batch, 2 * tiny_hift.config.n_bins, 64 * n_frames + 1, generator=gen
    )
    checked = tiny_hift.istft(conv_post_out)
    unchecked = tiny_hift.istft(conv_post_out, checked=False)
    assert unchecked.shape == checked.shape == (batch, 256 * n_frames)
    assert torch.equal(unchecked, checked)
    mel = torch.cat([_mel(n_frames, seed=s) for s in range(batch)])
    source = torch.randn(batch, 1, 256 * n_frames, generator=gen).tanh()
    assert torch.equal(tiny_hift.decode(mel, source, checked=False), tiny_hift.decode(mel, source))


def test_source_repeats_each_frames_f0_over_its_samples(tiny_hift: HiFTGenerator) -> None:
    f0 = torch.tensor([[0.0, 120.0, 240.0], [90.0, 0.0, 300.0]])
    hop = tiny_hift.config.upsample_factor
    draws = tiny_hift.draw(2, 3 * hop, torch.Generator().manual_seed(5))
    want = tiny_hift.m_source(f0.repeat_interleave(hop, dim=-1)[:, None, :], draws)
    assert torch.equal(tiny_hift.source_from_f0(f0, draws), want)
