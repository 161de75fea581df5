// Swagger UI over this sidecar's own OpenAPI document, with the console's token (if any).
"use strict";

(async () => {
  const key = "sop-llm-token";
  let token = sessionStorage.getItem(key);
  for (;;) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const res = await fetch("/openapi.json", { headers });
    if (res.status === 401) {
      token = window.prompt(token ? "That token was refused. Sidecar token:" : "Sidecar token (SOP_SIDECAR_TOKEN):");
      if (token === null) return;
      sessionStorage.setItem(key, token);
      continue;
    }
    const spec = await res.json();
    // "Try it out" talks to this sidecar, wherever it is reached
    spec.servers = [{ url: location.origin, description: "this sidecar" }];
    // validatorUrl null: no badge fetched from a validator service (the page works offline)
    const ui = SwaggerUIBundle({ spec, dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null });
    if (token) ui.preauthorizeApiKey("bearerAuth", token);
    return;
  }
})();
