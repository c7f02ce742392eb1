-- icp-bridge farm: a PostgreSQL role per host, with row-level security.
--
-- With one shared role every host can write every row of the farm: another
-- host's sessions, heartbeat, events and failed-logon counts. With a role
-- per host (named exactly as the host's host_name) and these policies, a
-- host (or whoever has its password file) writes only rows of its own
-- host; it still reads the whole farm (the farm view, the farm journal,
-- reconnect routing, the failed-logon budgets need that) and may queue a
-- command for any host (signed: bridge/farm/signing.py; a row it writes
-- is never run unless signed with the farm's command key).
--
-- Run it as a superuser (or the tables' owner, with CREATEROLE) in the
-- farm's database once the tables exist (the first start of a host with
-- the owner's role makes them), and again after an icp-bridge upgrade that
-- changes the farm's schema:
--     sudo -u postgres psql -v ON_ERROR_STOP=1 -d icpfarm -f farm-host-roles.sql
-- Then one login role per host, member of icpbridge_hosts:
--     sudo -u postgres createuser --pwprompt --role=icpbridge_hosts host-a
-- and in each host's farm_database: user=host-a (its own password file).
-- The owner must not be a host's role (an owner is not held by policies),
-- and no host's role a superuser or with BYPASSRLS.
-- Tested by tests/farm/test_farm_roles.py.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'icpbridge_hosts') THEN
        CREATE ROLE icpbridge_hosts NOLOGIN;
    END IF;
END $$;

GRANT USAGE ON SCHEMA public TO icpbridge_hosts;
GRANT SELECT ON farm_meta, farm_hosts, farm_events, farm_sessions, farm_commands,
    farm_failures TO icpbridge_hosts;
GRANT INSERT, UPDATE ON farm_hosts TO icpbridge_hosts;
GRANT INSERT, DELETE ON farm_events TO icpbridge_hosts;
GRANT INSERT, UPDATE, DELETE ON farm_sessions, farm_failures, farm_commands
    TO icpbridge_hosts;
GRANT USAGE ON SEQUENCE farm_events_id_seq, farm_commands_id_seq TO icpbridge_hosts;

ALTER TABLE farm_hosts ENABLE ROW LEVEL SECURITY;
ALTER TABLE farm_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE farm_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE farm_failures ENABLE ROW LEVEL SECURITY;
ALTER TABLE farm_commands ENABLE ROW LEVEL SECURITY;

-- Every host reads the whole farm (policies of one command are OR'ed).
DROP POLICY IF EXISTS farm_read ON farm_hosts;
CREATE POLICY farm_read ON farm_hosts FOR SELECT TO icpbridge_hosts USING (true);
DROP POLICY IF EXISTS farm_read ON farm_events;
CREATE POLICY farm_read ON farm_events FOR SELECT TO icpbridge_hosts USING (true);
DROP POLICY IF EXISTS farm_read ON farm_sessions;
CREATE POLICY farm_read ON farm_sessions FOR SELECT TO icpbridge_hosts USING (true);
DROP POLICY IF EXISTS farm_read ON farm_failures;
CREATE POLICY farm_read ON farm_failures FOR SELECT TO icpbridge_hosts USING (true);
DROP POLICY IF EXISTS farm_read ON farm_commands;
CREATE POLICY farm_read ON farm_commands FOR SELECT TO icpbridge_hosts USING (true);

-- ...and writes only its own rows: host = its role. Pruning the farm
-- journal (DELETE) so removes each host's own old events.
DROP POLICY IF EXISTS farm_own ON farm_hosts;
CREATE POLICY farm_own ON farm_hosts FOR ALL TO icpbridge_hosts
    USING (host = current_user) WITH CHECK (host = current_user);
DROP POLICY IF EXISTS farm_own ON farm_events;
CREATE POLICY farm_own ON farm_events FOR ALL TO icpbridge_hosts
    USING (host = current_user) WITH CHECK (host = current_user);
DROP POLICY IF EXISTS farm_own ON farm_sessions;
CREATE POLICY farm_own ON farm_sessions FOR ALL TO icpbridge_hosts
    USING (host = current_user) WITH CHECK (host = current_user);
DROP POLICY IF EXISTS farm_own ON farm_failures;
CREATE POLICY farm_own ON farm_failures FOR ALL TO icpbridge_hosts
    USING (host = current_user) WITH CHECK (host = current_user);

-- Commands: any host queues one for any host, pending and without a
-- result; only the host it names answers it (or prunes it).
DROP POLICY IF EXISTS farm_queue ON farm_commands;
CREATE POLICY farm_queue ON farm_commands FOR INSERT TO icpbridge_hosts
    WITH CHECK (state = 'pending' AND result IS NULL AND finished_at IS NULL);
DROP POLICY IF EXISTS farm_answer ON farm_commands;
CREATE POLICY farm_answer ON farm_commands FOR UPDATE TO icpbridge_hosts
    USING (host = current_user) WITH CHECK (host = current_user);
DROP POLICY IF EXISTS farm_prune ON farm_commands;
CREATE POLICY farm_prune ON farm_commands FOR DELETE TO icpbridge_hosts
    USING (host = current_user);
