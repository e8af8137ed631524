# The two quickstart targets (README.md). `.ci/run` calls `make test`.
PYTHON ?= python
INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[dev,bench]"

# Joint guidance at weight 1 is the plain conditional model: one DiT pass per ODE step instead of additive
# guidance's three. Measured on the demo model with its earlier 250-step stage 1: evaluate.py took 120 s instead
# of 206 s, and FD was 51.6 instead of 48.3 (benchmarks/README.md, guidance sweep). The demo scores per dataset:
# its cell types have fewer than 30 test cells each (docs/evaluation.md, "Conditions").
DEMO_SAMPLING = sampling.guidance=joint

.PHONY: install demo test lint

install:
	$(INSTALL)

# The whole story on the embedded demo atlas: atlas -> stage 1 -> stage 2 -> generate -> evaluate -> compare.
demo: install
	$(PYTHON) -m data_pipelines.demo
	$(PYTHON) launchers/train_vae.py
	$(PYTHON) launchers/train_ldm.py
	$(PYTHON) launchers/generate.py like_split=test num_cells=1000 $(DEMO_SAMPLING) out=runs/ldm-demo/generated.h5ad
	$(PYTHON) launchers/evaluate.py $(DEMO_SAMPLING) protocol.condition_columns=[dataset_id] \
		--json runs/ldm-demo/eval-test/evaluation.json
	$(PYTHON) launchers/compare.py --max-runs 3 --out runs/compare.md --plot runs/compare_loss.png
	@echo ""
	@echo "generated cells (h5ad):  runs/ldm-demo/generated.h5ad"
	@echo "evaluation report:       runs/ldm-demo/eval-test/  (evaluation.json, umap_real_vs_generated.png, per_condition_metrics.png)"
	@echo "training plots:          runs/vae-demo/plots/, runs/ldm-demo/plots/"
	@echo "run comparison:          runs/compare.md, runs/compare_loss.png"
	@echo "MLflow store:            mlruns.db  ->  mlflow ui --backend-store-uri sqlite:///mlruns.db"

lint:
	ruff check .
	lint-imports

test: install lint
	$(PYTHON) -m pytest -q -n 2 --dist loadfile
