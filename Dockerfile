# Full application image (training + CLI) on a CUDA base. Build: docker build -t vision_peft .
# Run:   docker run --gpus all -v $PWD/data:/data -v $PWD/weights:/weights vision_peft train classification-aid
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 NO_ALBUMENTATIONS_UPDATE=1 GRADIO_ANALYTICS_ENABLED=False \
    VISION_PEFT_DATA=/data VISION_PEFT_WEIGHTS=/weights
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# dependencies first (cache-friendly): only pyproject changes invalidate this layer
COPY pyproject.toml README.md ./
RUN mkdir vision_peft && touch vision_peft/__init__.py && pip install . && pip uninstall -y vision_peft
COPY vision_peft ./vision_peft
COPY tasks ./tasks
RUN pip install --no-deps . && useradd --create-home --uid 1000 app
USER 1000
ENTRYPOINT ["python", "-m", "vision_peft"]
CMD ["list"]
