# The gateway image for docker-compose.yml: the gateway only, no CUDA; it starts vLLM
# containers through the Docker socket and reads GPU memory through NVML (the NVIDIA
# container runtime mounts libnvidia-ml into this container).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY plugins ./plugins
RUN pip install . && rm -rf /src

WORKDIR /var/lib/vllm-gateway
EXPOSE 8080
CMD ["vllm-gateway", "serve", "--config", "/etc/vllm-gateway/config.yaml", "--host", "0.0.0.0"]
