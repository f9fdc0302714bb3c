# One image for every Tandem process (api, worker-nlu, worker-gen, flower); the command picks the role.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY services ./services
# CPU torch from PyTorch's CPU index; a GPU image installs its CUDA build here instead.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -c constraints.txt . flower
ENV TANDEM_DATA_DIR=/data HF_HOME=/models HF_HUB_OFFLINE=1
VOLUME ["/data", "/models"]
EXPOSE 8080
CMD ["tandem", "api", "--host", "0.0.0.0", "--port", "8080"]
