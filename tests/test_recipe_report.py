"""Recipes reproduce runs bit for bit; the report is a page whose figures and links all exist."""

import json
from html.parser import HTMLParser

import pytest
import yaml

import sparsellm
from sparsellm.cli import main
from sparsellm.recipe import RECIPE_FILE, Recipe
from sparsellm.report import REPORT_FILE


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def same_weights(a, b) -> bool:
    """The weights two folders rebuild (compact folders are decoded) are identical, bit for bit."""
    left, right = sparsellm.load(a, kernels="dense").state_dict(), sparsellm.load(b, kernels="dense").state_dict()
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


@pytest.fixture(scope="module")
def pruned(llama_folder, tmp_path_factory):
    """Two results from the CLI: OWL + Wanda with evaluation, and sensitivity + SparseGPT."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--model", str(llama_folder), "--sparsity", "0.6", "--nsamples", "4", "--seqlen", "64"]
    assert main(["prune", *common, "--method", "wanda", "--allocation", "owl", "--owl-lambda", "0.1", "--eval",
                 "--eval-seqlen", "64", "--eval-windows", "3", "--output", str(root / "owl")]) == 0
    assert main(["prune", *common, "--method", "sparsegpt", "--allocation", "sensitivity",
                 "--sensitivity-windows", "2", "--output", str(root / "sensitivity")]) == 0
    return root


def test_a_recipe_reproduces_the_cli_flags_bit_for_bit(pruned, llama_folder, tmp_path, capsys):
    written = tmp_path / "by-hand.yaml"
    written.write_text(yaml.safe_dump({
        "model": str(llama_folder), "method": "wanda", "sparsity": 0.6, "allocation": "owl",
        "allocation_options": {"lam": 0.1}, "calibration": {"nsamples": 4, "seqlen": 64},
        "evaluation": {"enabled": True, "seqlen": 64, "windows": 3}}))
    code, _, err = run_cli(capsys, "prune", "--recipe", str(written), "--output", str(tmp_path / "from-recipe"))
    assert code == 0, err
    assert same_weights(pruned / "owl", tmp_path / "from-recipe")
    # the recipe saved with a result reproduces it too, and holds every option resolved
    saved = Recipe.load(pruned / "owl" / RECIPE_FILE)
    assert saved.allocation_options == {"m": 5.0, "lam": 0.1} and saved.calibration["nsamples"] == 4
    assert run_cli(capsys, "prune", "--recipe", str(pruned / "owl" / RECIPE_FILE), "--output",
                   str(tmp_path / "again"))[0] == 0
    assert same_weights(pruned / "owl", tmp_path / "again")
    sensitivity = Recipe.load(pruned / "sensitivity" / RECIPE_FILE)
    assert sensitivity.allocation_options["levels"] == [0.5, 0.6, 0.7]
    assert sensitivity.method_options == {"blocksize": 128, "percdamp": 0.01, "calibration_inputs": "pruned"}


def test_flags_override_the_recipe(pruned, tmp_path, capsys):
    code, out, err = run_cli(capsys, "prune", "--recipe", str(pruned / "owl" / RECIPE_FILE), "--sparsity", "0.3",
                             "--allocation", "uniform", "--output", str(tmp_path / "o"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["achieved_sparsity"] == pytest.approx(0.3, abs=1e-3) and result["allocation"]["name"] == "uniform"
    assert yaml.safe_load((tmp_path / "o" / RECIPE_FILE).read_text())["allocation_options"] == {}


@pytest.mark.parametrize(("recipe", "extra", "message"), [
    ({"method": "wanda", "sparsity": 0.5, "colour": "red"}, [], "unknown key(s) colour"),
    ({"method": "wanda", "sparsity": 0.5, "calibration": {"samples": 4}}, [], "unknown key(s) in calibration"),
    ({"method": "wanda", "sparsity": 0.5}, ["--percdamp", "0.1"], "bad option for method wanda"),
    ({"method": "wanda", "sparsity": 0.5, "target": {"max_ppl_increase": "5%"}}, [], "give one of a sparsity"),
    ({"method": "wanda", "pattern": "2:4", "target": {"max_ppl_increase": "5%"}}, [], "N:M fixes it"),
    ({"method": "wanda", "target": {"max_ppl_increase": "lots"}}, [], "as a share"),
])
def test_bad_recipes_are_one_line_errors(llama_folder, tmp_path, capsys, recipe, extra, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(llama_folder)} | recipe))
    code, _, err = run_cli(capsys, "prune", "--recipe", str(path), "--output", str(tmp_path / "o"), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


class References(HTMLParser):
    """Every src/href of a page, and the ids of its SVG elements."""

    def __init__(self):
        super().__init__()
        self.links, self.ids = [], []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.links += [attributes[key] for key in ("src", "href") if key in attributes]
        if "id" in attributes:
            self.ids.append(attributes["id"])


def test_report_has_one_bar_per_layer_and_only_links_that_exist(pruned, tmp_path, capsys):
    folders = [pruned / "owl", pruned / "sensitivity"]
    code, out, err = run_cli(capsys, "report", *map(str, folders), "--output", str(tmp_path / "report"))
    assert code == 0, err
    page = tmp_path / "report" / REPORT_FILE
    assert out.strip() == str(page)
    parser = References()
    parser.feed(page.read_text())
    assert parser.links and all((page.parent / link).is_file() for link in parser.links)
    assert {"sparsity-1.png", "sparsity-2.png", "allocation-1.png", "allocation-2.png", "perplexity.png",
            "size.png"} <= set(parser.links)
    for index, folder in enumerate(folders, 1):
        layers = [layer["name"] for layer in json.loads((folder / "sparsity.json").read_text())["layers"]]
        bars = [i.split(":", 1)[1] for i in parser.ids if i.startswith(f"sparsity-{index}:")]
        assert bars == layers  # one bar per layer, in order
    # one folder: the report goes inside it by default
    assert run_cli(capsys, "report", str(pruned / "owl"))[0] == 0
    assert (pruned / "owl" / "report" / REPORT_FILE).is_file()
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == 2 and "no sparsity.json" in err


def test_a_table_from_the_command_line_is_kept_inline_in_the_recipe(llama_folder, tmp_path, capsys):
    table = tmp_path / "table.yaml"
    table.write_text("'mlp': 0.8\n'self_attn\\.(q|k)_proj': 0.2\n")
    code, out, err = run_cli(capsys, "prune", "--model", str(llama_folder), "--method", "magnitude", "--table",
                             str(table), "--output", str(tmp_path / "o"), "--json")
    assert code == 0, err
    targets = {layer["name"]: layer["target"] for layer in json.loads(out)["layers"]}
    assert targets["model.layers.1.mlp.down_proj"] == 0.8 and targets["model.layers.0.self_attn.k_proj"] == 0.2
    assert "model.layers.0.self_attn.v_proj" not in targets or targets["model.layers.0.self_attn.v_proj"] == 0
    saved = Recipe.load(tmp_path / "o" / RECIPE_FILE)
    assert saved.allocation == "table" and saved.allocation_options["rules"]["mlp"] == 0.8
    table.unlink()  # the recipe does not need the file any more
    assert run_cli(capsys, "prune", "--recipe", str(tmp_path / "o" / RECIPE_FILE), "--output",
                   str(tmp_path / "again"))[0] == 0
    assert same_weights(tmp_path / "o", tmp_path / "again")


def test_quantization_and_format_in_a_recipe_match_the_flags(llama_folder, tmp_path, capsys):
    flags = ["--model", str(llama_folder), "--method", "wanda", "--pattern", "2:4", "--allocation", "owl",
             "--owl-lambda", "0.3", "--nsamples", "4", "--seqlen", "64", "--bits", "4", "--group-size", "32",
             "--asym", "--format", "dense", "--dtype", "bfloat16"]
    assert run_cli(capsys, "prune", *flags, "--output", str(tmp_path / "flags"))[0] == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(llama_folder), "method": "wanda", "pattern": "2:4", "allocation": "owl",
        "allocation_options": {"lam": 0.3}, "calibration": {"nsamples": 4, "seqlen": 64},
        "quantization": {"bits": 4, "group_size": 32, "symmetric": False}, "format": "dense",
        "save_dtype": "bfloat16"}))
    code, _, err = run_cli(capsys, "prune", "--recipe", str(recipe), "--output", str(tmp_path / "recipe"))
    assert code == 0, err
    assert same_weights(tmp_path / "flags", tmp_path / "recipe")
    metadata = json.loads((tmp_path / "recipe" / "sparsity.json").read_text())
    assert metadata["quantization"]["bits"] == 4 and metadata["recipe"]["format"] == "dense"
    assert {layer["pattern"] for layer in metadata["layers"]} <= {"1:4", "2:4", "3:4", "dense"}
