"""scripts/cost.py against figures worked out by hand from stacks/prices.py.

Hand arithmetic (730 h a month):
  dev   g6e.xlarge 1 x 1.861 x 730                 = 1358.53
        m7i.xlarge 2 x 0.2016 x 730                =  294.336   (max 3: 441.504)
        EKS 0.10 x 730                             =   73.00
        NAT 0.045 x 730 + its IPv4 0.005 x 730     =   32.85 + 3.65
        NLB 0.0225 x 730                           =   16.425
        roots (150 + 2 x 50) GiB x 0.08            =   20.00    (max 150 + 3 x 50: 24.00)
        Redis 5, Prometheus 20, Grafana 10, UI 10 GiB x 0.08 = 0.40 + 1.60 + 0.80 + 0.80
        total 1802.391, at max size 1953.559
  staging   2 x 1.861 x 730 + 2 x 15.06559 x 730   = 2717.06 + 21995.7614
            system, EKS, NAT, IPv4, NLB as dev     =  294.336 + 73 + 32.85 + 3.65 + 16.425
            roots (2x300 + 2x400 + 2x50) x 0.08    =  120.00
            Redis 10, Prometheus 50, Grafana 10, UI 10 GiB = 0.80 + 4.00 + 0.80 + 0.80
            total 25259.4824; staging - dev = 23457.0914
  prod  4 x 1.861 x 730 + 2 x 55.04 x 730          = 5434.12 + 80358.40
        m7i.2xlarge 3 x 0.4032 x 730               =  883.008
        EKS 73, 3 NAT 98.55 + 3 IPv4 10.95, NLB 16.425
        roots (4x300 + 2x1000 + 3x50) x 0.08       =  268.00
        Redis 20, Prometheus 200, Grafana 10 GiB (no web UI) = 1.60 + 16.00 + 0.80
        total 87160.853
"""

from __future__ import annotations

import dataclasses
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from scripts.cost import CostError, Estimate, estimate, main
from stacks.settings import ROOT, load_stack_file


def dev_estimate() -> Estimate:
    return estimate(load_stack_file(ROOT / "Pulumi.dev.yaml"), "dev")


@pytest.mark.parametrize(
    ("stack", "monthly"),
    [
        pytest.param("dev", Decimal("1802.391"), id="dev"),
        pytest.param("staging", Decimal("25259.4824"), id="staging"),
        pytest.param("prod", Decimal("87160.853"), id="prod"),
    ],
)
def test_monthly_total(stack: str, monthly: Decimal) -> None:
    assert estimate(load_stack_file(ROOT / f"Pulumi.{stack}.yaml"), stack).monthly == monthly


def test_ceiling_prices_every_group_at_max_size() -> None:
    assert dev_estimate().ceiling == Decimal("1953.559")


def test_dev_lines() -> None:
    lines = {line.item: (line.monthly, line.ceiling) for line in dev_estimate().lines}
    assert lines == {
        "GPU nodes l40s": (Decimal("1358.53"), Decimal("1358.53")),
        "system nodes": (Decimal("294.336"), Decimal("441.504")),
        "EKS control plane": (Decimal("73"), Decimal("73")),
        "NAT gateways": (Decimal("32.85"), Decimal("32.85")),
        "NAT public IPv4": (Decimal("3.65"), Decimal("3.65")),
        "gateway NLB": (Decimal("16.425"), Decimal("16.425")),
        "EBS gp3 node roots": (Decimal("20"), Decimal("24")),
        "EBS gp3 Redis volume": (Decimal("0.4"), Decimal("0.4")),
        "EBS gp3 Prometheus volume": (Decimal("1.6"), Decimal("1.6")),
        "EBS gp3 Grafana volume": (Decimal("0.8"), Decimal("0.8")),
        "EBS gp3 web UI volume": (Decimal("0.8"), Decimal("0.8")),
    }


def test_weight_pvcs_are_one_per_pod() -> None:
    settings = load_stack_file(ROOT / "Pulumi.staging.yaml")
    big = settings.deployment("qwen3-vl-32b")
    pvc = dataclasses.replace(big, weights=dataclasses.replace(big.weights, cache="pvc"))
    deployments = tuple(pvc if d is big else d for d in settings.serving.deployments)
    changed = dataclasses.replace(
        settings, serving=dataclasses.replace(settings.serving, deployments=deployments)
    )
    line = next(x for x in estimate(changed, "s").lines if x.item == "EBS gp3 weights qwen3-vl-32b")
    # 1 group x 2 nodes x 200 GiB x 0.08 (max replicas is 1 as well)
    assert (line.monthly, line.ceiling) == (Decimal("32"), Decimal("32"))


def test_nat_traffic_is_priced_only_when_given() -> None:
    settings = load_stack_file(ROOT / "Pulumi.dev.yaml")
    with_traffic = estimate(settings, "dev", nat_gb=Decimal(100))
    assert with_traffic.monthly - dev_estimate().monthly == Decimal("4.5")  # 100 GB x 0.045
    assert any("NAT data processing excluded" in a for a in dev_estimate().assumptions)


def test_a_type_without_price_is_refused() -> None:
    settings = load_stack_file(ROOT / "Pulumi.dev.yaml")
    group = dataclasses.replace(settings.gpu_node_groups[0], instance_type="p4d.24xlarge")
    unpriced = dataclasses.replace(settings, gpu_node_groups=(group,))
    with pytest.raises(
        CostError, match=r"gpuNodeGroups\[0\]\.instanceType=p4d\.24xlarge: no price"
    ):
        estimate(unpriced, "dev")


def test_delta_between_stacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stack", "staging", "--against", "dev", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#### Monthly cost: +$23,457.09 ($1,802.39 -> $25,259.48)")
    assert "| GPU nodes l40s-efa | $0.00 | $21,995.76 | +$21,995.76 |" in out.splitlines()
    # unchanged lines are left out of the PR comment
    assert "| EKS control plane |" not in out


def test_delta_against_a_previous_version_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.yaml"
    shutil.copy(ROOT / "Pulumi.dev.yaml", base)
    head = tmp_path / "Pulumi.dev.yaml"
    head.write_text(base.read_text().replace("    desiredSize: 2\n", "    desiredSize: 3\n", 1))
    assert main(["--stack", "dev", "--file", str(head), "--base-file", str(base)]) == 0
    out = capsys.readouterr().out.splitlines()
    # one more m7i.xlarge (147.168) and its 50 GiB root (4.00)
    assert next(x for x in out if x.startswith("system nodes")).split()[-1] == "+$147.17"
    assert next(x for x in out if x.startswith("EBS gp3 node roots")).split()[-1] == "+$4.00"
    assert next(x for x in out if x.startswith("total")).split()[-1] == "+$151.17"


def test_markdown_estimate_states_source_and_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stack", "prod", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#### Monthly cost of `prod`: $87,160.85")
    # The table was written from memory: the comment must say so, and where to check it.
    assert (
        "AWS on-demand list prices, us-east-1, meant as of 2025-06-15 but written from memory"
        in out
    )
    assert "https://aws.amazon.com/ec2/pricing/on-demand/" in out


def test_another_region_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "Pulumi.dev.yaml"
    moved.write_text(
        (ROOT / "Pulumi.dev.yaml")
        .read_text()
        .replace("aws:region: us-east-1", "aws:region: eu-west-1")
    )
    moved.write_text(moved.read_text().replace("us-east-1a, us-east-1b", "eu-west-1a, eu-west-1b"))
    assert main(["--stack", "dev", "--file", str(moved)]) == 1
    assert "the price table is for us-east-1; dev runs in eu-west-1" in capsys.readouterr().err


def test_an_invalid_stack_file_is_one_clean_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "Pulumi.dev.yaml"
    bad.write_text(
        (ROOT / "Pulumi.dev.yaml").read_text().replace("replicas: 1\n", "replicas: one\n", 1)
    )
    assert main(["--stack", "dev", "--file", str(bad)]) == 1
    assert "gateway.replicas=one: must be an integer" in capsys.readouterr().err


def test_an_unknown_stack_is_one_clean_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stack", "dev", "--against", "nope"]) == 1
    err = capsys.readouterr().err
    assert "Pulumi.nope.yaml" in err
    assert "file: no such stack file" in err


def test_a_directory_for_a_stack_file_is_one_clean_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--stack", "dev", "--file", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"cost: {tmp_path}: 1 configuration problem(s):\n  - file: cannot read it: Is a directory\n"
    )


@pytest.mark.parametrize("value", ["NaN", "-5", "lots", "Infinity"])
def test_nat_traffic_must_be_gigabytes(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--stack", "dev", "--nat-gb", value])
    assert stop.value.code == 2
    assert f"argument --nat-gb: '{value}' is not a number of GB >= 0" in capsys.readouterr().err
