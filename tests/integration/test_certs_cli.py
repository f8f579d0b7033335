"""``mlx-relay certs``: the CA and device certificates it writes, and the configuration lines
it prints, run a TLS cluster with client certificates; keys are 0600 and never replaced
without --force."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from mlx_relay.cli import main
from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.model.tokenizer import encode_prompt
from tests.support.cluster import cluster_dict, local_cluster
from tests.support.reference import cached_tokenizer, reference_tokens

PROMPT = "The quick brown fox"


def write_cluster(path: Path, model_dir: Path, **extra: object) -> Path:
    data = cluster_dict(model_dir, 2, **extra)  # type: ignore[arg-type]
    data["devices"][2]["host"] = "10.1.2.3"
    path.write_text(yaml.safe_dump(data))
    return path


def printed_settings(output: str) -> dict[str, object]:
    """The YAML the command prints after its explanation."""
    return yaml.safe_load(output[output.index("\nnetwork:") :])


async def test_the_certificates_it_makes_run_a_cluster_with_client_certificates(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cluster(tmp_path / "cluster.yaml", tiny_model_dir)
    out = tmp_path / "certs"
    assert main(["certs", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("ca", "coordinator", "worker-0", "worker-1"):
        assert str(out / f"{name}.pem") in printed and str(out / f"{name}.key") in printed
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
    settings = printed_settings(printed)
    network = settings["network"]
    assert network == {"tls": {"ca_file": str(out / "ca.pem"), "require_client_cert": True}}
    devices = {d["id"]: {"tls": d["tls"]} for d in settings["devices"]}  # type: ignore[union-attr]
    assert set(devices) == {"coordinator", "worker-0", "worker-1"}

    remote = x509.load_pem_x509_certificate((out / "worker-1.pem").read_bytes())
    names = remote.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    shown = {str(n.value) for n in names}
    assert shown == {"10.1.2.3", "127.0.0.1", "::1", "localhost"}

    ids = encode_prompt(cached_tokenizer(tiny_model_dir), prompt=PROMPT, chat=False)
    expected = [t.token_id for t in reference_tokens(tiny_model_dir, ids, 6)]
    async with local_cluster(tiny_model_dir, 2, network=network, devices=devices) as cluster:
        response = await cluster.orchestrator.process_request(
            InferenceRequest(prompt=PROMPT, max_tokens=6)
        )
    assert response.token_ids == expected


def test_it_refuses_to_replace_keys_without_force(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cluster(tmp_path / "cluster.yaml", tiny_model_dir)
    out = tmp_path / "certs"
    assert main(["certs", "--config", str(config), "--out", str(out)]) == 0
    key = (out / "worker-0.key").read_bytes()
    capsys.readouterr()
    assert main(["certs", "--config", str(config), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "already there; give --force" in error and "worker-0.key" in error
    assert (out / "worker-0.key").read_bytes() == key
    (out / "worker-0.key").chmod(0o644)
    assert main(["certs", "--config", str(config), "--out", str(out), "--force"]) == 0
    assert (out / "worker-0.key").read_bytes() != key
    assert stat.S_IMODE((out / "worker-0.key").stat().st_mode) == 0o600
