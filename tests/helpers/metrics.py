"""Reading the Prometheus text exposition in tests: one sample's value by name and labels."""

from __future__ import annotations


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` (exactly these labels) in ``text``, None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and got == want:
            return float(value)
    return None
