# make demo : set-up + toy MDP pretraining (2 CPU processes, torchrun) + fine-tuning on toy Cityscapes
# make test : set-up + the whole test suite
PY   := .venv/bin/python
RUN  := runs/demo
TOY  := data/toy
# CPU threads: the two torchrun workers get one each, a single process gets them all
THREADS ?= 2
# precision of the demo's runs: auto = bf16 where native (CUDA, avx512_bf16 CPUs), else fp32;
# `make demo AMP=none` gives the README's fp32 table on any machine
AMP ?= auto

.PHONY: demo test probe venv clean
venv: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(TOY)/.written: .venv/.installed datasets.py toy.py
	@echo "== writing the toy datasets"
	$(PY) toy.py make-toy --root $(TOY)
	touch $@

# Toy budget: a few minutes on 2 CPU cores. resnet14 = a Bottleneck ResNet with one block per stage
# (same key names and 2048-d output as resnet50); toy images are ~128 px, kept at native scale.
# Output stride 16 (the paper's 8 costs about 2-5x on a CPU), 100 pretraining steps, and 60
# fine-tuning steps of 4 crops: the whole demo fits 6 minutes on 2 cores, the install included.
PRETRAIN_FLAGS := --datasets voc ade20k --data-root $(TOY) --arch resnet14 --output-stride 16 \
	--crop-size 96 96 --base-size 128 128 --batch-size 4 --iters 100 --optimizer adamw --lr 1e-3 \
	--weight-decay 1e-4 --schedule cosine --min-lr 1e-5 --warmup-iters 20 --bank-size 128 \
	--workers 0 --log-interval 10 --amp $(AMP)
FINETUNE_FLAGS := --dataset cityscapes --data-root $(TOY) --output-stride 16 --crop-size 64 128 \
	--base-size 192 96 --batch-size 4 --iters 60 --eval-interval 60 --workers 0 --amp $(AMP)

demo: $(TOY)/.written
	@echo "== demo 1/6: MDP pretraining on toy VOC + ADE20K, 2 processes"
	OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 train_pretrain.py \
		$(PRETRAIN_FLAGS) --out-dir $(RUN)/pretrain
	OMP_NUM_THREADS=$(THREADS) $(PY) finetune.py --ckpt $(RUN)/pretrain/last.pth $(FINETUNE_FLAGS) \
		--out-dir $(RUN)/ft_mdp
	OMP_NUM_THREADS=$(THREADS) $(PY) finetune.py --ckpt none --arch resnet14 $(FINETUNE_FLAGS) \
		--out-dir $(RUN)/ft_scratch
	OMP_NUM_THREADS=$(THREADS) $(PY) finetune.py --ckpt $(RUN)/pretrain/last.pth --model linear \
		$(FINETUNE_FLAGS) --out-dir $(RUN)/probe_mdp
	OMP_NUM_THREADS=$(THREADS) $(PY) finetune.py --ckpt none --arch resnet14 --model linear \
		$(FINETUNE_FLAGS) --out-dir $(RUN)/probe_random
	$(PY) tools/compare.py $(RUN)/ft_scratch $(RUN)/ft_mdp $(RUN)/probe_random $(RUN)/probe_mdp \
		--pretrain-log $(RUN)/pretrain/log.jsonl
	$(PY) tools/plot_log.py $(RUN)/pretrain/log.jsonl --out $(RUN)/pretrain_curves.png

# after make demo: fine-tuned vs frozen backbone, MDP vs random init, 3 seeds (results/toy/backbone_probe.md)
probe: $(TOY)/.written
	OMP_NUM_THREADS=$(THREADS) $(PY) studies/backbone_probe.py --ckpt $(RUN)/pretrain/last.pth \
		-- $(FINETUNE_FLAGS)

# test-only packages (timm, segmentation_models_pytorch: tests/test_export.py); make demo skips them
.venv/.installed-test: .venv/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# two pytest workers of one thread each: most tests are single-threaded subprocesses
test: .venv/.installed-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(THREADS) tests

clean:
	rm -rf runs $(TOY)
