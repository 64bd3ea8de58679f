"""The README's tour runs as written: every ```python block, in order, in one namespace."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5, "the README's tour lost its examples"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
    # A few of the values the tour shows, so that its comments stay true.
    assert namespace["hidden_width"](512, gated=True) == 1536
    assert torch.isfinite(namespace["out"].loss)
    assert namespace["q2"].shape == namespace["q"].shape
    assert namespace["seg"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert namespace["bf16"].layers[0].attn.q_proj.weight.dtype == torch.bfloat16
