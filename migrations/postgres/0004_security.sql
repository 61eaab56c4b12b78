-- Security model (docs/security.md): scoped API keys and per-user token revocation.

-- Keys created before scopes existed could do everything: they stay `admin`.
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT 'admin';

-- Device tokens of `user_id` with iat <= revoked_before (unix seconds) are refused.
CREATE TABLE token_revocations (
    user_id        TEXT PRIMARY KEY,
    revoked_before BIGINT NOT NULL
);
