# northstar serving: Triton with the project's Python models, for either target.
#
#   TARGET=gpu (the default): `retrieval` runs on Triton's own onnxruntime backend on the
#     GPU; `recommend` is a Python-backend model that calls it (BLS).
#   TARGET=cpu: `retrieval` and `recommend` run model.onnx in onnxruntime inside the
#     Python backend (no GPU needed; the image adds onnxruntime to Triton's Python).
#
# Export for the target first, then build with the same target (the build refuses a
# repository exported for the other one):
#
#   northstar export --run runs/demo --repo model_repository --target gpu
#   docker build --build-arg TARGET=gpu -t northstar-serving:gpu .
#   docker run --gpus all --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 northstar-serving:gpu
#
#   northstar export --run runs/demo --repo model_repository --target cpu
#   docker build --build-arg TARGET=cpu -t northstar-serving:cpu .
#   docker run --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 northstar-serving:cpu
#
# The Python backend passes tensors through /dev/shm: Docker's default 64 MB is too small
# for several model instances, hence --shm-size. On Kubernetes the overlays name the tag
# for their target (deploy/overlays/{cpu,gpu}); /models is the shared volume there.

ARG TARGET=gpu

# 24.10 ships Triton server 2.51.0: the same server as the nvidia-pytriton 0.7.0 binary the
# tests run, so what passes there (configs, BLS, repository API) behaves the same here.
# Both targets: the cpu one needs no CUDA, but the same server and Python backend keep the
# two images behaving alike (the image runs on nodes without a GPU).
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ARG TARGET
RUN case "$TARGET" in cpu|gpu) ;; \
      *) echo "TARGET=$TARGET: expected cpu or gpu" >&2; exit 1 ;; esac
LABEL io.northstar.target="$TARGET"

# Only what the Python models import: numpy < 2 (the backend stub breaks on numpy 2) and
# pandas (models.features). On gpu, `retrieval` needs no Python packages.
# redis, hiredis and pyarrow: the online store and the event stream (online/,
# feedback/stream.py), used when NORTHSTAR_ONLINE_STORE or a redis:// event log is set.
RUN python3 -m pip install --no-cache-dir "numpy==1.26.4" "pandas==2.3.3" \
    "redis==8.1.0" "hiredis==3.5.0" "async-timeout==5.0.1" "pyarrow==25.0.1"
# cpu: onnxruntime in the Python backend (models/onnx_session.py, serving/inline.py, the
# cpu `retrieval`'s model.py). 1.23.2: the newest release with a wheel for this image's
# Python 3.10 (pyproject's onnxruntime-gpu pin has none); it reads the export's opset 18.
# faiss-cpu: versions exported with index.mode hnsw|ivf search their faiss index in the
# stub (models/ann.py).
RUN if [ "$TARGET" = cpu ]; then \
      python3 -m pip install --no-cache-dir "onnxruntime==1.23.2" "faiss-cpu==1.15.1" \
      && python3 -c "import onnxruntime, faiss"; \
    fi

# The project modules the Python models import, and nothing else (no torch, no training).
WORKDIR /opt/northstar
COPY common/__init__.py common/files.py common/config.py common/stub_python.py \
     common/redact.py common/
COPY online/__init__.py online/cache.py online/config.py online/rows.py online/state.py \
     online/store.py online/view.py online/routing_store.py online/
COPY models/__init__.py models/features.py models/onnx_session.py models/snapshot.py \
     models/ann.py models/
COPY serving/__init__.py serving/auth.py serving/backend.py serving/core_slots.py serving/inline.py \
     serving/live.py serving/metrics.py serving/recommender.py serving/repository.py serving/routing.py \
     serving/
# Impression logging (recommend) and interaction ingest (the feedback model).
COPY feedback/__init__.py feedback/events.py feedback/sink.py feedback/sink_api.py feedback/hook.py \
     feedback/explore.py feedback/ids.py feedback/ingest.py feedback/live.py \
     feedback/stream.py feedback/consume.py feedback/lag.py feedback/lake.py feedback/
# A .pth file rather than PYTHONPATH: the backend stub imports from the interpreter's own
# site-packages, which is what a .pth extends.
RUN python3 -c "import site; print(site.getsitepackages()[0])" \
    | xargs -I{} sh -c 'echo /opt/northstar > {}/northstar.pth' \
    && python3 -c "import serving.recommender, serving.backend, serving.inline, serving.auth, \
feedback.hook, feedback.ingest"

COPY model_repository/ /models/
# The exported repository must be this image's target: serving.repository.config_target
# reads `backend: "python"` as cpu and `platform: "onnxruntime_onnx"` as gpu.
RUN case "$TARGET" in \
      gpu) grep -q '^platform: "onnxruntime_onnx"' /models/retrieval/config.pbtxt ;; \
      cpu) grep -q '^backend: "python"' /models/retrieval/config.pbtxt ;; \
      *) false ;; \
    esac \
    || (echo "model_repository was not exported with --target $TARGET" >&2 && exit 1)
# cpu: the inline path (recommend runs model.onnx itself) imports onnxruntime.
RUN if [ "$TARGET" = cpu ]; then python3 -c "import onnxruntime, serving.inline"; fi

# Never run the server as root. The image's triton-server user exists in recent releases;
# create it where it does not.
RUN id -u triton-server >/dev/null 2>&1 || useradd --create-home --uid 1000 triton-server
# The event log lives on a volume: acknowledged events must outlive the container. (On
# Kubernetes NORTHSTAR_EVENT_LOG names the Redis stream instead: deploy/.)
RUN mkdir -p /var/lib/northstar && chown triton-server /var/lib/northstar
ENV NORTHSTAR_EVENT_LOG=/var/lib/northstar/events.db
VOLUME /var/lib/northstar
USER triton-server

EXPOSE 8000 8001 8002

# Ready means "can answer" (README, "What ready means"): strict readiness, and `recommend`
# refuses to load when production cannot be served, so this check fails exactly then.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python3 -c "import sys, urllib.request; \
sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"

# The control plane (load/unload, model config, shared memory, trace, logging) is locked
# behind the admin key, which comes from the environment at run time, never from the
# image: mount it as a secret file and point NORTHSTAR_ADMIN_KEY_FILE at it, e.g.
#   docker run --mount type=bind,src=$HOME/.config/northstar/admin.key,dst=/run/secrets/admin.key,ro \
#              -e NORTHSTAR_ADMIN_KEY_FILE=/run/secrets/admin.key ...
# serving.auth adds the restricted-API flags and execs tritonserver; with no key it refuses
# to start rather than serve an open control plane.
ENTRYPOINT ["python3", "-m", "serving.auth", "exec"]
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", \
     "--load-model=retrieval", "--load-model=recommend", "--load-model=feedback", \
     "--strict-readiness=true", \
     "--exit-timeout-secs=10"]
