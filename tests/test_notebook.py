"""examples/quickstart.ipynb runs headless in a real Jupyter kernel, and shows HTML where it should."""
import pathlib
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_renders_html(tmp_path):
    """Every cell runs without error; explain() and the bench result display as HTML tables."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.km_kwargs = {"kernel_cmd": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    html = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert len(html) == 2, html
    assert "cpuboost" in html[0] and "<table>" in html[0] and "eager+passes" in html[0]  # the explain() report
    assert "eager fp32" in html[1] and "<table" in html[1]  # the bench result
    text = "".join(out.get("text", "") for out in outputs)
    assert "torch.Size([2, 10])" in text
