
import pytest
import yaml

from cspresnet.recipe import RecipeError, recipe_to_dict, recipe_to_yaml
from cspresnet.recipe_files import describe_recipe, load_recipe
import train
from tests.helpers import in_this_process


def test_darknet_recipe_values():
    r = load_recipe("cspresnet50.yaml")
    assert (r.epochs, r.batch_size, r.label_smoothing) == (80, 128, 0.1)
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert r.optim.decay_norm_and_bias is False
    assert (r.schedule.name, r.schedule.burn_in_iters, r.schedule.power) == ("darknet_poly", 1000, 4.0)
    assert (r.data.img_size, r.data.train_interpolation, r.data.crop_scale) == (256, "bilinear", (0.08, 1.0))
    assert (r.data.eval_img_size, r.data.eval_crop_pct, r.data.eval_interpolation) == (256, 0.887, "bilinear")
    assert r.runtime.amp == "bf16"
    assert r.scaled_lr() == 0.1 and r.burn_in_steps() == 1000


def test_extension_keeps_base_values_and_overrides_its_own():
    demo = load_recipe("demo.yaml")
    assert demo.batch_size == 32 and demo.data.img_size == 64
    assert demo.optim.lr == 0.1 and demo.optim.weight_decay == 5e-4  # from the base
    assert demo.data.eval_crop_pct == 0.887  # sibling key of an overridden section


def test_base_is_found_next_to_the_file_and_chains(tmp_path):
    (tmp_path / "a.yaml").write_text("base: cspresnet50.yaml\nepochs: 5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim:\n  lr: 0.2\n")
    r = load_recipe(str(tmp_path / "b.yaml"))
    assert (r.epochs, r.optim.lr, r.batch_size) == (5, 0.2, 128)


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_overrides_are_typed():
    r = load_recipe("cspresnet50.yaml", ["optim.weight_decay=1e-4", "epochs=3", "runtime.compile=true",
                                         "data.crop_scale=[0.2, 1]", "runtime.amp=fp16"], data_dir="/x")
    assert (r.optim.weight_decay, r.epochs, r.runtime.compile, r.data.crop_scale, r.runtime.amp) == (1e-4, 3, True, (0.2, 1.0), "fp16")
    assert r.data.dir == "/x"


def test_linear_lr_scaling_with_the_global_batch():
    r = load_recipe("cspresnet50.yaml", ["batch_size=1024"])
    assert r.scaled_lr() == pytest.approx(0.8)
    assert r.burn_in_steps() == 125  # the same 128,000 images of burn-in
    r = load_recipe("cspresnet50.yaml", ["batch_size=1024", "optim.lr_scaling=none"])
    assert r.scaled_lr() == 0.1


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown recipe key 'optim.lrr'.*allowed keys: name, lr,"),
    ("epoch=3", "unknown recipe key 'epoch'.*allowed keys: epochs,"),
    ("epochs=three", "'epochs' must be an integer, got 'three'"),
    ("epochs=2.5", "'epochs' must be an integer"),
    ("optim.lr=fast", "'optim.lr' must be a number"),
    ("runtime.amp=fp8", "'runtime.amp' must be one of 'bf16', 'fp16', 'none', got 'fp8'"),
    ("runtime.compile=1", "'runtime.compile' must be true or false"),
    ("data.crop_scale=[0.1]", "'data.crop_scale' must be a list of 2 numbers"),
    ("optim=3", "section 'optim' must be a mapping"),
    ("batch_size=0", "'batch_size' must be >= 1, got 0"),
    ("optim.lr=-0.1", "'optim.lr' must be > 0"),
    ("optim.momentum=1.5", "'optim.momentum' must be in \\[0, 1\\)"),
    ("label_smoothing=1", "'label_smoothing' must be in \\[0, 1\\)"),
    ("data.img_size=16", "'data.img_size' must be >= 32"),
    ("data.crop_scale=[0.9, 0.1]", "'data.crop_scale' must be \\[min, max\\]"),
    ("data.eval_crop_pct=1.2", "'data.eval_crop_pct' must be in \\(0, 1\\]"),
    ("model.num_classes=0", "'model.num_classes' must be >= 1"),
    ("schedule.power=0", "'schedule.power' must be > 0"),
    ("optim.lr", "must look like key.sub=value"),
    ("epochs.sub=1", "'epochs' is a value, not a section"),
    ("optim.lr=.inf", "recipe key 'optim.lr' must be a finite number, got inf"),
    ("optim.lr=nan", "recipe key 'optim.lr' must be a finite number, got nan"),
    ("optim.lr=-.inf", "recipe key 'optim.lr' must be a finite number, got -inf"),
    ("optim.weight_decay=1e400", "recipe key 'optim.weight_decay' must be a finite number, got inf"),
    ("data.crop_scale=[0.1, .inf]", "recipe key 'data.crop_scale\\[1\\]' must be a finite number, got inf"),
    ("data.crop_ratio=[0.75, .inf]", "recipe key 'data.crop_ratio\\[1\\]' must be a finite number, got inf"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("cspresnet50.yaml", [override])


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(RecipeError, match="not found.*cspresnet50.yaml"):
        load_recipe("nope.yaml")


def test_bad_yaml_is_reported(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(tmp_path / "bad.yaml"))


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe("demo.yaml", ["optim.lr=0.3"])
    (tmp_path / "resolved.yaml").write_text(recipe_to_yaml(r))
    assert load_recipe(str(tmp_path / "resolved.yaml")) == r


def test_print_recipe_cli():
    out = in_this_process(train.main, "--recipe", "cspresnet50.yaml", "--print-recipe", "optim.lr=0.2").stdout
    printed = yaml.safe_load(out)
    assert printed["optim"]["lr"] == 0.2 and printed["optim"]["weight_decay"] == 5e-4
    assert printed["batch_size"] == 128 and printed["schedule"]["burn_in_iters"] == 1000


def notes(described: str) -> dict:
    """{dotted key: the note after its value} from describe_recipe's output."""
    found, section = {}, ""
    for line in described.splitlines():
        if line.endswith(":"):
            section = line[:-1]
            continue
        key = line.split(":")[0].strip()
        found[f"{section}.{key}" if line.startswith(" ") else key] = line[line.index("# [") + 2:]
    return found


def test_describe_recipe_names_the_file_that_set_each_value_last_and_the_comment_there(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "base: cspresnet50.yaml\n"
        "epochs: 5        # five epochs,\n"
        "                 # for a quick look\n"
        "\n"
        "                 # a blank line ends a comment\n"
        "seed: 3          # a seed\n"
        "data:\n"
        "  dir: 'x # y'   # the '#' in the value is not the comment\n"
        "  workers: 2     # two\n"
        "    # in another column: not part of it\n"
    )
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 4\noptim: {lr: 0.2, momentum: 0.8}  # flow style\n")
    overrides = ["model={num_classes: 5}", "batch_size=64"]
    described = describe_recipe(str(tmp_path / "b.yaml"), overrides)
    assert yaml.safe_load(described) == recipe_to_dict(load_recipe(str(tmp_path / "b.yaml"), overrides))
    note = notes(described)
    assert note["epochs"] == "[a.yaml] five epochs, for a quick look"
    assert note["seed"] == "[b.yaml]"  # b set it last, without a comment: a's comment went with a's value
    assert note["data.dir"] == "[a.yaml] the '#' in the value is not the comment"
    assert note["data.workers"] == "[a.yaml] two"
    assert note["optim.lr"] == note["optim.momentum"] == "[b.yaml] flow style"
    assert note["optim.weight_decay"].startswith("[cspresnet50.yaml] cfg decay=0.0005. ")
    assert note["data.img_size"] == "[cspresnet50.yaml] cfg width=256 height=256"
    assert note["batch_size"] == "[command line: batch_size=64]"
    assert note["model.num_classes"] == "[command line: model={num_classes: 5}]"
    assert note["model.drop_rate"] == "[default]"  # the override replaced the whole section
    assert note["runtime.stop_timeout_s"] == "[default]"
    with_dir = notes(describe_recipe(str(tmp_path / "b.yaml"), data_dir="/data/imagenet"))
    assert with_dir["data.dir"] == "[command line: --data-dir /data/imagenet]"


def test_describe_recipe_reads_comments_in_windows_line_endings_and_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes("\ufeffepochs: 5   # five,\r\n            # really\r\nseed: 2\r\n".encode())
    note = notes(describe_recipe(str(path)))
    assert (note["epochs"], note["seed"], note["batch_size"]) == ("[crlf.yaml] five, really", "[crlf.yaml]", "[default]")


def test_cli_error_is_one_clear_line():
    result = in_this_process(train.main, "--recipe", "cspresnet50.yaml", "optim.lrr=1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown recipe key 'optim.lrr'")
    assert "Traceback" not in result.stderr


def test_a_key_given_twice_in_a_recipe_file_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("base: cspresnet50.yaml\noptim:\n  lr: 0.2\n  momentum: 0.8\n\n  # again\n  lr: 0.3\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(str(path))
    assert str(raised.value) == f"recipe {path}: key 'lr' appears twice in section 'optim' (lines 3 and 7)"

    path.write_text("base: cspresnet50.yaml\nepochs: 3\nseed: 1\nepochs: 4\n")
    with pytest.raises(RecipeError, match="key 'epochs' appears twice at the top level \\(lines 2 and 4\\)"):
        load_recipe(str(path))


def test_a_key_given_twice_in_a_base_file_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("base: cspresnet50.yaml\ndata:\n  img_size: 64\n  img_size: 96\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nepochs: 3\n")
    with pytest.raises(RecipeError, match=f"recipe {tmp_path / 'base.yaml'}: key 'img_size' appears twice "
                                          "in section 'data' \\(lines 3 and 4\\)"):
        load_recipe(str(tmp_path / "child.yaml"))


def test_a_key_given_twice_in_an_override_value_is_refused():
    with pytest.raises(RecipeError, match="override 'optim=\\{lr: 0.2, lr: 0.3\\}': key 'lr' appears twice "
                                          "in section 'optim'"):
        load_recipe("cspresnet50.yaml", ["optim={lr: 0.2, lr: 0.3}"])


def test_a_data_section_that_is_not_a_mapping_is_the_same_error_with_a_data_dir():
    with pytest.raises(RecipeError) as without:
        load_recipe("demo.yaml", ["data=5"])
    with pytest.raises(RecipeError) as with_dir:
        load_recipe("demo.yaml", ["data=5"], data_dir="x")
    assert str(with_dir.value) == str(without.value) == "recipe section 'data' must be a mapping, got 5"


def test_cli_data_dir_with_a_data_section_that_is_not_a_mapping_is_one_clear_line(tmp_path):
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tmp_path, "data=5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: recipe section 'data' must be a mapping, got 5"
    assert "Traceback" not in result.stderr


def refusal(name_or_path, overrides=None) -> str:
    """The RecipeError's message, the same from load_recipe and from describe_recipe
    (--print-recipe), and one line."""
    with pytest.raises(RecipeError) as loading:
        load_recipe(str(name_or_path), overrides)
    with pytest.raises(RecipeError) as describing:
        describe_recipe(str(name_or_path), overrides)
    assert str(loading.value) == str(describing.value)
    assert "\n" not in str(loading.value)
    return str(loading.value)


def test_a_recipe_that_is_not_utf8_is_refused_with_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("base: cspresnet50.yaml\n# caf\u00e9\nepochs: 3\n".encode("latin-1"))
    assert refusal(path) == (f"recipe {path} is not UTF-8 text: byte 0xe9 at offset 28 (line 2) is not valid UTF-8; "
                             "recipes must be UTF-8 text")


def test_a_base_file_that_is_not_utf8_is_refused_by_its_own_name(tmp_path):
    (tmp_path / "base.yaml").write_bytes(b"\xff\xfee\x00p\x00")  # UTF-16
    (tmp_path / "child.yaml").write_text("base: base.yaml\nepochs: 3\n")
    assert refusal(tmp_path / "child.yaml").startswith(f"recipe {tmp_path / 'base.yaml'} is not UTF-8 text: "
                                                       "byte 0xff at offset 0 (line 1)")


@pytest.mark.parametrize("text", ["", "\n  \n", "# all of it\n# commented out\n", "~\n"])
def test_an_empty_recipe_is_refused_rather_than_read_as_the_defaults(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert refusal(path) == (f"recipe {path} is empty (no keys, only blank space, comments or null); a recipe is a "
                             "mapping of keys to values, at least 'base: cspresnet50.yaml'")


def test_an_empty_base_file_is_refused_by_its_own_name(tmp_path):
    (tmp_path / "base.yaml").write_bytes(b"")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    assert refusal(tmp_path / "child.yaml").startswith(f"recipe {tmp_path / 'base.yaml'} is empty")


@pytest.mark.parametrize("text, kind", [("- epochs: 3\n", "list"), ("epochs\n", "str"), ("3\n", "int")])
def test_a_recipe_whose_top_level_is_not_a_mapping_is_refused(tmp_path, text, kind):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    assert refusal(path) == f"recipe {path} must be a mapping of keys to values (key: value lines), got {kind}"


@pytest.mark.parametrize("line, given", [("base:", "empty"), ("base: ''", "empty"), ("base: ' '", "empty"),
                                         ("base: [a.yaml]", "['a.yaml']")])
def test_an_empty_base_is_refused_with_the_file_and_line(tmp_path, line, given):
    path = tmp_path / "x.yaml"
    path.write_text(f"epochs: 3\n{line}\n")
    assert refusal(path) == (f"recipe {path}, line 2: base is {given}; base must name a recipe file (a path next to "
                             "this one, or a name in recipes/ such as cspresnet50.yaml), or be left out")


def test_a_missing_base_names_the_file_that_refers_to_it(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("# b extends a file that is not there\nbase: gone.yaml\nepochs: 3\n")
    message = refusal(tmp_path / "a.yaml")
    assert message.startswith(f"recipe 'gone.yaml' (base of {tmp_path / 'b.yaml'}, line 2) does not exist: ")
    assert "(available: cspresnet50.yaml," in message


def test_a_base_loop_names_every_file_in_it(tmp_path):
    a, b, c = (tmp_path / f"{name}.yaml" for name in "abc")
    a.write_text("base: b.yaml\n")
    b.write_text("base: c.yaml\n")
    c.write_text("base: b.yaml\n")
    assert refusal(a) == f"recipe {b} extends itself through: {a} -> {b} -> {c} -> {b}"
    a.write_text("base: a.yaml\n")
    assert refusal(a) == f"recipe {a} extends itself through: {a} -> {a}"


@pytest.mark.parametrize("overrides, key", [(["epochs=1", "seed=2", "epochs=2"], "epochs"),
                                            (["data.workers=1", "data.workers=2"], "data.workers")])
def test_an_override_given_twice_is_refused_with_both_values(overrides, key):
    first, second = [o for o in overrides if o.startswith(key + "=")]
    assert refusal("demo.yaml", overrides) == (f"override key '{key}' is given twice: '{first}' and '{second}'; "
                                               "give each key once")


@pytest.mark.parametrize("overrides", [["data={workers: 1}", "data.workers=2"],
                                       ["data.workers=2", "data={img_size: 96}"]])
def test_an_override_of_a_section_and_one_of_a_key_inside_it_are_refused_in_either_order(overrides):
    assert refusal("demo.yaml", overrides) == (
        f"override key 'data.workers' is inside section 'data', which is also given: '{overrides[0]}' and "
        f"'{overrides[1]}'; give each key once (the section's keys one by one, or the whole section)")


def test_overrides_of_keys_whose_names_start_alike_are_not_duplicates():
    r = load_recipe("demo.yaml", ["model.initial_weights=w.pt", "model.initial_weights_kind=ema", "data.workers=1",
                                  "data.img_size=96"])
    assert (r.model.initial_weights, r.model.initial_weights_kind, r.data.workers, r.data.img_size) == (
        "w.pt", "ema", 1, 96)


def test_cli_recipe_that_is_not_utf8_is_one_line_and_exit_2_before_anything_is_made(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"epochs: 3 # \xe9\n")
    for extra in (["--print-recipe"], ["--output", tmp_path / "run", "--data-dir", tmp_path / "nothing"]):
        result = in_this_process(train.main, "--recipe", path, *extra)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"error: recipe {path} is not UTF-8 text: byte 0xe9 at offset 12 "
                                              "(line 1) is not valid UTF-8; recipes must be UTF-8 text"]
        assert result.stdout == ""
    assert not (tmp_path / "run").exists()
