"""The README's training-step example runs and lowers the loss."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
LOSS_LINE = "    loss = float(np.mean(error ** 2))\n"


def test_readme_training_example_lowers_the_loss():
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert LOSS_LINE in example
    recorded = example.replace(LOSS_LINE, LOSS_LINE + "    losses.append(loss)\n")
    namespace = {"losses": []}
    exec(compile(recorded, str(README), "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 100
    assert losses[-1] < 0.98 * losses[0]
