"""What runs in a user's script or notebook: the SGLang frontend endpoint and role helpers
(`frontend`), our launcher as a child process (`server_process`, `frontend.Runtime`), the
example agent's tools (`tools`) and the embedded SmolLM2 model (`models`)."""
