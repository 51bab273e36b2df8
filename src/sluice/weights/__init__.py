"""The weight-transfer wire format, shared by the side that sends weights (``sluice.sync``, the trainer) and the
side that receives them (``sluice.engine``): bucket layout and checksums (``buckets``), CUDA IPC payloads
(``ipc``), the broadcast process group (``process_group``) and safetensors checkpoint directories
(``safetensors_files``, also how models load). The engine and sync reach each other's shared pieces only here."""
