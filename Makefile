# Every target sets up what it needs: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is what the dev machines carry; on a GPU box pick your CUDA build.
TORCH ?= torch==2.13.0
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
TRITON_IMAGE ?= nvcr.io/nvidia/tritonserver:25.04-py3
# The default models' folders: config.pbtxt written from the spec (again when it changes) and tiny weights.
WEIGHT_FILES := $(foreach m,sd_base sd_depth sd_inpaint sd_upscale,model_repository/$(m)/1/weights/model_index.json model_repository/$(m)/config.pbtxt)

.PHONY: FORCE venv lock weights weights-full weights-hub model adapter compile-cache models serve serve-docker demo test test-fast test-full lint docs env package package-slim image upload mme deploy teardown iam-policy bench bench-gpu bench-coldstart bench-adapters stats playground browser clean

# TORCH as a file that changes only when TORCH does: `make venv TORCH=...` installs the torch asked for.
venv: $(VENV)/.installed
$(VENV)/torch.setting: FORCE
	@mkdir -p $(VENV) && echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@
$(VENV)/.installed: pyproject.toml env/dev.lock $(VENV)/torch.setting
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)" -c env/dev.lock
	$(PY) -m pip install -e ".[dev]" -c env/dev.lock
	touch $@

weights: $(WEIGHT_FILES)
$(WEIGHT_FILES) &: sdmme/spec.py sdmme/model_folder.py | $(VENV)/.installed
	$(PY) -m sdmme.tools.weights tiny --if-missing
	@touch $(WEIGHT_FILES)

# The real architectures at full size with random weights (offline; about 2.6 GB per model): bench, serving tests.
weights-full: venv
	$(PY) -m sdmme.tools.weights full --force

# Real weights from the Hugging Face hub (fp16 safetensors, about 5 GB); replaces tiny ones.
weights-hub: venv
	$(PY) -m sdmme.tools.weights hub --force

# Your own model, served as <NAME>.tar.gz next to the defaults: weights from a single-file checkpoint
# (.safetensors), a diffusers folder or a hub id, optionally with a LoRA fused in (docs/models.md).
REPOSITORY ?= model_repository
LORA_SCALE ?= 1.0
model: venv
	@test -n "$(NAME)" -a -n "$(KIND)" -a -n "$(WEIGHTS)" || (echo "usage: make model NAME=my_style KIND=sd_base|sd_depth|sd_inpaint|sd_upscale WEIGHTS=file.safetensors|folder|hub-id [LORA=file-or-hub-id LORA_SCALE=1.0] [CONFIG=folder-or-hub-id] [FORCE=1]"; exit 2)
	$(PY) -m sdmme.tools.repository "$(NAME)" --kind "$(KIND)" --weights "$(WEIGHTS)" --repository "$(REPOSITORY)" \
	  $(if $(LORA),--lora "$(LORA)" --lora-scale $(LORA_SCALE)) $(if $(CONFIG),--config "$(CONFIG)") $(if $(FORCE),--force)

# An adapter (a LoRA) of a model, served per request on the warm model (docs/models.md).
adapter: weights
	@test -n "$(NAME)" -a -n "$(MODEL)" -a -n "$(FILE)" || (echo "usage: make adapter NAME=ink MODEL=sd_base FILE=lora.safetensors|hub-id [FORCE=1]"; exit 2)
	$(PY) -m sdmme.adapters "$(NAME)" --model "$(MODEL)" --file "$(FILE)" --repository "$(REPOSITORY)" $(if $(FORCE),--force)

# torch.compile's caches for MODEL (its config.pbtxt sets compile), built on this machine's GPU for
# endpoints of that GPU type; make package ships them (docs/settings.md).
compile-cache: weights
	@test -n "$(MODEL)" || (echo "usage: make compile-cache MODEL=sd_base [SHAPES=512:1,512:8]"; exit 2)
	$(PY) -m sdmme.tools.compile_cache --model "$(MODEL)" --repository "$(REPOSITORY)" $(if $(SHAPES),--shapes "$(SHAPES)")

serve: weights
	$(PY) -m deploy.local.tritonserver --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# GPU machines with docker: NGC's tritonserver with this repository mounted; installs the runtime at start.
serve-docker: weights
	docker run --gpus all --rm --shm-size=1g \
	  -p $(HTTP_PORT):8000 -p $(GRPC_PORT):8001 -p $(METRICS_PORT):8002 \
	  -v "$(CURDIR)":/src -w /src $(TRITON_IMAGE) \
	  bash -c "pip install --break-system-packages -r /src/env/serving.txt /src \
	    && tritonserver --model-repository=/src/model_repository --model-control-mode=explicit '--load-model=*'"

demo: weights
	$(PY) -m client.demo

# The playground page on 127.0.0.1:PLAYGROUND_PORT (docs/playground.md): make serve's models, with a
# tritonserver started on model_repository/ when none answers at HTTP_PORT. For an endpoint:
# PLAYGROUND='--endpoint-name sd-mme --endpoint-url http://127.0.0.1:8080' (the local MME) or '--endpoint-name NAME'.
PLAYGROUND ?= --url 127.0.0.1:$(HTTP_PORT) --model-repository model_repository
PLAYGROUND_PORT ?= 7860
playground: weights
	$(PY) -m client.playground $(PLAYGROUND) --port $(PLAYGROUND_PORT)

# Debian's Chromium, which the playground's browser tests drive (apt, as root; without it they skip, saying so).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "make browser: Debian's chromium could not be installed (not root?): the playground's browser tests will skip"

test: venv browser
	$(PY) -m pytest

# The lane to run after each change (docs/development.md): no tritonserver, moto, browser or packed
# environment, nothing that compiles for minutes; under 5 minutes on 2 cores.
test-fast: venv
	SDMME_TEST_LANE=fast $(PY) -m pytest -m "not server and not slow and not full"

# Only the four real architectures at full size on CPU (random weights; about 2 minutes, 6 GB of memory).
test-full: venv
	$(PY) -m pytest -m full

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf out dist .pytest_cache

# SageMaker MME artifacts: env/sd_env/, dist/<model>.tar.gz, then s3://BUCKET/PREFIX/<model>.tar.gz
BUCKET ?=
PREFIX ?= sd-mme/models
ENV_BUILDER ?= auto
# Without conda: cpu (TORCH's CPU build, this machine's Python; local serving) or gpu (env/serving.txt as
# pinned, CUDA torch and xformers; ENV_PYTHON must be the image's Python, 3.12 for 25.04).
ENV_FLAVOR ?= cpu
ENV_PYTHON ?= $(PYTHON)

# How the environment is built, as a file that changes only when a setting does: switching flavor or
# Python rebuilds it. TORCH counts for the cpu flavor only (gpu takes torch from env/serving.txt).
ENV_SETTINGS = builder=$(ENV_BUILDER) flavor=$(ENV_FLAVOR) python=$(ENV_PYTHON)$(if $(filter cpu,$(ENV_FLAVOR)), torch=$(TORCH))
env/sd_env.settings: FORCE
	@echo '$(ENV_SETTINGS)' | cmp -s - $@ || echo '$(ENV_SETTINGS)' > $@
FORCE:

# env/serving.lock and env/dev.lock: after a change to env/serving.txt or pyproject.toml's extras, every
# dependency resolved again at an exact version
lock: venv
	$(PY) -m env.lock --torch "$(TORCH)"

env: env/sd_env/sdmme-env.json
env/sd_env/sdmme-env.json: env/sd_env.settings pyproject.toml environment.yml env/serving.txt env/serving.lock env/dev.lock $(wildcard sdmme/*.py sdmme/*/*.py) | $(VENV)/.installed
	$(PY) -m env --builder $(ENV_BUILDER) --flavor $(ENV_FLAVOR) --python "$(ENV_PYTHON)" --torch "$(TORCH)"

# gzip level of the archives: 0 (stored) makes every cold load's extraction a copy (docs/benchmarks.md)
GZIP_LEVEL ?= 0
package: weights env
	$(PY) -m deploy.aws.package --gzip-level $(GZIP_LEVEL)

# Slim archives (weights, config, model code) for an image that carries the environment (make image).
IMAGE_ENV_PATH ?= /opt/sdmme/sd_env
package-slim: weights env
	$(PY) -m deploy.aws.package --dist dist-slim --slim-env-path $(IMAGE_ENV_PATH) --gzip-level $(GZIP_LEVEL)

# SageMaker's Triton image with env/sd_env/ at IMAGE_ENV_PATH, pushed to IMAGE_URI (an ECR repository of
# yours). Needs docker and ECR logins for AWS's registry and yours; not runnable on the dev machines.
REGION ?= us-east-1
image: env
	@test -n "$(IMAGE_URI)" || (echo "usage: make image IMAGE_URI=<account>.dkr.ecr.<region>.amazonaws.com/sdmme:$(IMAGE_TAG) [REGION=$(REGION)]"; exit 2)
	docker build -f docker/Dockerfile -t "$(IMAGE_URI)" --build-arg ENV_PATH=$(IMAGE_ENV_PATH) \
	  --build-arg BASE=$$($(PY) -m deploy.aws.containers --region $(REGION) --tag $(IMAGE_TAG)) .
	docker push "$(IMAGE_URI)"

upload: venv
	@test -n "$(BUCKET)" || (echo "usage: make upload BUCKET=my-bucket [PREFIX=sd-mme/models]"; exit 2)
	$(PY) -m deploy.aws.upload --bucket "$(BUCKET)" --prefix "$(PREFIX)" --repository "$(REPOSITORY)" $(if $(VERSION),--version "$(VERSION)") $(if $(REPLACE),--replace)

# The models under s3://BUCKET/PREFIX/ with their kinds and adapters (what an endpoint on that prefix serves).
models: venv
	@test -n "$(BUCKET)" || (echo "usage: make models BUCKET=my-bucket [PREFIX=sd-mme/models]"; exit 2)
	$(PY) -m deploy.aws.upload --bucket "$(BUCKET)" --prefix "$(PREFIX)" --list

# Local SageMaker MME on MME_PORT, models from s3://BUCKET/PREFIX/ (S3 via AWS_ENDPOINT_URL when set).
MME_PORT ?= 8080
MAX_MODELS ?= 4
mme: venv
	@test -n "$(BUCKET)" || (echo "usage: make mme BUCKET=my-bucket [PREFIX=...] [MME_PORT=8080]"; exit 2)
	$(PY) -m deploy.local.mme --bucket "$(BUCKET)" --prefix "$(PREFIX)" --port $(MME_PORT) --max-models $(MAX_MODELS) \
	  $(if $(MME_PYTHON),--python-version $(MME_PYTHON)) $(if $(METRICS),--metrics-port $(METRICS_PORT))

# The real SageMaker endpoint (needs AWS credentials and an execution role: make iam-policy).
ENDPOINT ?= sd-mme
INSTANCE_TYPE ?= ml.g5.xlarge
INSTANCE_COUNT ?= 1
IMAGE_TAG ?= 25.04
AUTOSCALE ?=
deploy: venv
	@test -n "$(BUCKET)" -a -n "$(ROLE_ARN)" || (echo "usage: make deploy BUCKET=... ROLE_ARN=... [PREFIX=...] [INSTANCE_TYPE=...] [AUTOSCALE='--min-instances 1 --max-instances 4'] [METRICS=1]"; exit 2)
	$(PY) -m deploy.aws.sagemaker deploy --name $(ENDPOINT) --bucket "$(BUCKET)" --prefix "$(PREFIX)" --role-arn "$(ROLE_ARN)" \
	  --image-tag $(IMAGE_TAG) --instance-type $(INSTANCE_TYPE) --instance-count $(INSTANCE_COUNT) $(AUTOSCALE) \
	  $(if $(IMAGE_URI),--image-uri "$(IMAGE_URI)") $(if $(METRICS),--metrics)

teardown: venv
	$(PY) -m deploy.aws.sagemaker teardown --name $(ENDPOINT)

iam-policy: venv
	@$(PY) -m deploy.aws.sagemaker iam-policy --bucket "$(BUCKET)" --prefix "$(PREFIX)"

bench: weights
	$(PY) -m bench.serving

# A machine with a CUDA GPU (and a CUDA torch: make venv TORCH=...); appends to docs/benchmarks.md.
bench-gpu: venv
	$(PY) -m bench.gpu

# Cold start at real size, before/after/slim (GPU environment and full-size weights: about 45 GB of disk,
# about 12 minutes per model on 2 cores; MODELS= picks some); appends to docs/benchmarks.md.
bench-coldstart: venv
	$(PY) -m bench.coldstart $(if $(MODELS),--models $(MODELS))

# A LoRA as an adapter of a warm model against the same LoRA as its own model, at full size, through the
# local MME; and its cost per denoising step, unfused and fused (about 3 GB of disk, 15 minutes on 2 cores).
bench-adapters: env
	$(PY) -m bench.adapters

# A table per model from a metrics port: make serve's (default), the local MME's (make mme METRICS=1) or
# any Triton's (STATS_URL=host:port); EVERY=5 prints again every 5 s (docs/operating.md).
STATS_URL ?= 127.0.0.1:$(METRICS_PORT)
stats: venv
	$(PY) -m deploy.ops.stats --url $(STATS_URL) $(if $(EVERY),--every $(EVERY))

docs: venv
	$(PY) -m sdmme.tools.docs
