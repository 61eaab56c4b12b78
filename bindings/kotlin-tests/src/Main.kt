// Kotlin tests of the generated binding against a real gateway (started by run.sh).
// A plain `main`: runs every check, prints "N passed, M failed", exits non-zero on
// any failure (helpers in TestKit.kt). Environment: HERALD_URL, HERALD_API_KEY,
// HERALD_TEST_DIR.

import dev.herald.sdk.*
import java.io.File
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.atomic.AtomicInteger

val baseUrl: String = System.getenv("HERALD_URL") ?: error("HERALD_URL not set")
val apiKey: String = System.getenv("HERALD_API_KEY") ?: error("HERALD_API_KEY not set")
val testDir: File = File(System.getenv("HERALD_TEST_DIR") ?: error("HERALD_TEST_DIR not set"))

fun http(method: String, path: String, body: String?, bearer: String): Pair<Int, String> =
    httpRequest(method, baseUrl + path, body, bearer)

fun jsonField(json: String, name: String): String =
    Regex("\"$name\"\\s*:\\s*\"([^\"]*)\"").find(json)?.groupValues?.get(1)
        ?: throw CheckFailed("no $name in $json")

/** Publishes `{"n": n}` to a device; returns the message id. */
fun publish(device: String, n: Int, extra: String = ""): String {
    val (code, body) = http(
        "POST", "/v1/messages",
        """{"to":{"device":"$device"},"data":{"n":$n},"push":"never"$extra}""", apiKey,
    )
    check(code == 202) { "publish answered $code: $body" }
    return jsonField(body, "message_id")
}

/** A token of `user`; bound to `device` (its `did`) when given, as device routes require. */
fun mintToken(user: String, ttlSeconds: Int, device: String? = null): String {
    val did = if (device != null) ""","device_id":"$device"""" else ""
    val (code, body) = http("POST", "/v1/tokens", """{"user":"$user","ttl_seconds":$ttlSeconds$did}""", apiKey)
    check(code == 200 || code == 201) { "token mint answered $code: $body" }
    return jsonField(body, "token")
}

class Recorder : HeraldListener {
    val states = CopyOnWriteArrayList<ConnectionState>()
    val messages = CopyOnWriteArrayList<HeraldMessage>()
    val errors = CopyOnWriteArrayList<ErrorEvent>()
    // Callbacks come from one SDK thread, one at a time (JNA may give the attached
    // native thread a new Java name per call, so count overlaps instead of names).
    val inside = AtomicInteger(0)
    val overlaps = AtomicInteger(0)

    private fun enter() {
        if (inside.incrementAndGet() != 1) overlaps.incrementAndGet()
        Thread.sleep(1)
    }
    private fun leave() { inside.decrementAndGet() }

    override fun onStateChanged(state: ConnectionState) {
        enter(); states.add(state); leave()
    }
    override fun onMessage(message: HeraldMessage) {
        enter(); messages.add(message); leave()
    }
    override fun onError(event: ErrorEvent) {
        errors.add(event)
    }
    override fun onSubscriptionChanged(topic: String, subscribed: Boolean) {}

    fun last(): ConnectionState? = states.lastOrNull()
    fun ns(): List<Int> = messages.map { Regex("\"n\":(\\d+)").find(it.dataJson)!!.groupValues[1].toInt() }
}

class Tokens(val user: String, val device: String, val ttlSeconds: Int = 3600) : TokenProvider {
    val calls = AtomicInteger(0)
    override fun fetchToken(): String {
        calls.incrementAndGet()
        return mintToken(user, ttlSeconds, device)
    }
}

fun config(device: String, dir: String = device) = ClientConfig(
    baseUrl = baseUrl,
    deviceId = device,
    dataDir = File(testDir, dir).path,
    backoffMinMs = 50uL,
    backoffMaxMs = 500uL,
)

fun main() {
    test("typed error on a bad URL") {
        try {
            HeraldClient(config("bad").copy(baseUrl = "not a url"), Recorder(), Tokens("u", "bad"))
            throw CheckFailed("no exception")
        } catch (e: HeraldException.InvalidConfig) {
            check(e.detail.contains("base_url")) { e.detail }
        }
    }

    test("isHeraldPush and jwtExpiry") {
        check(isHeraldPush("""{"herald_id":"m","herald_seq":"1"}""")) { "herald push" }
        check(!isHeraldPush("""{"from":"someone else"}""")) { "foreign push" }
        val token = mintToken("alice", 600)
        val exp = jwtExpiry(token)!!.toLong()
        val now = System.currentTimeMillis() / 1000
        check(exp in (now + 500)..(now + 700)) { "exp $exp now $now" }
    }

    test("connect, states, live message, backlog, de-dup across reconnect and restart") {
        val rec = Recorder()
        val tokens = Tokens("alice", "kt-1")
        var client = HeraldClient(config("kt-1"), rec, tokens)
        client.connect()
        waitFor("Connected") { rec.last() == ConnectionState.Connected }
        check(rec.states.first() == ConnectionState.Connecting) { "states ${rec.states}" }
        check(client.state() == ConnectionState.Connected) { "state() ${client.state()}" }
        // Live.
        publish("kt-1", 1)
        waitFor("live message") { rec.messages.size == 1 }
        check(rec.messages[0].seq == 1L) { "seq ${rec.messages[0].seq}" }
        check(rec.overlaps.get() == 0) { "callbacks overlapped" }
        // Offline publish, then backlog on reconnect.
        client.disconnect()
        waitFor("Disconnected") { rec.last() == ConnectionState.Disconnected }
        publish("kt-1", 2); publish("kt-1", 3); publish("kt-1", 4)
        client.connect()
        waitFor("backlog") { rec.messages.size >= 4 }
        Thread.sleep(300)
        check(rec.ns() == listOf(1, 2, 3, 4)) { "got ${rec.ns()}" }
        // App restart: a new client on the same data dir repeats nothing.
        client.shutdown()
        check(rec.last() == ConnectionState.Closed) { "last state ${rec.last()}" }
        val rec2 = Recorder()
        client = HeraldClient(config("kt-1"), rec2, tokens)
        client.connect()
        waitFor("Connected again") { rec2.last() == ConnectionState.Connected }
        publish("kt-1", 5)
        waitFor("message 5") { rec2.messages.isNotEmpty() }
        Thread.sleep(300)
        check(rec2.ns() == listOf(5)) { "after restart got ${rec2.ns()}" }
        client.shutdown()
    }

    test("token provider called again when the token expires") {
        val rec = Recorder()
        // 2 s tokens: always within the SDK's 30 s expiry margin, so every new
        // connection needs a fresh one.
        val tokens = Tokens("alice", "kt-exp", ttlSeconds = 2)
        val client = HeraldClient(config("kt-exp"), rec, tokens)
        client.connect()
        waitFor("Connected") { rec.last() == ConnectionState.Connected }
        check(tokens.calls.get() == 1) { "calls ${tokens.calls.get()}" }
        client.disconnect()
        waitFor("Disconnected") { rec.last() == ConnectionState.Disconnected }
        client.connect()
        waitFor("Connected with a new token") { rec.last() == ConnectionState.Connected && tokens.calls.get() == 2 }
        client.shutdown()
    }

    test("register push token and handle an FCM data payload") {
        val rec = Recorder()
        val client = HeraldClient(config("kt-push"), rec, Tokens("alice", "kt-push"))
        val reg = client.registerPushToken(PushProvider.FCM, "fcm-token-kotlin", null)
        check(reg.deviceId == "kt-push" && reg.user == "alice") { "$reg" }
        check(reg.pushTokenState == "active") { "$reg" }
        val id = publish("kt-push", 42)
        // What the gateway puts in FCM `data` for a content-free sync hint.
        val payload = """{"herald_id":"$id","herald_seq":"1","herald_device":"kt-push","herald_hint":"1"}"""
        val got = client.handlePush(payload)
        check(got.size == 1 && got[0].id == id && got[0].dataJson.contains("42")) { "got $got" }
        check(client.handlePush(payload).isEmpty()) { "duplicate push delivered again" }
        try {
            client.handlePush("""{"from":"another sdk"}""")
            throw CheckFailed("no exception")
        } catch (e: HeraldException.NotHeraldPush) {
        }
        // Connecting afterwards does not deliver it again.
        client.connect()
        waitFor("Connected") { rec.last() == ConnectionState.Connected }
        publish("kt-push", 43)
        waitFor("live message") { rec.messages.isNotEmpty() }
        Thread.sleep(300)
        check(rec.ns() == listOf(43)) { "listener got ${rec.ns()}" }
        client.shutdown()
    }

    test("device of another user: terminal Forbidden, no retries") {
        val owner = Recorder()
        val a = HeraldClient(config("kt-owned", "kt-owned-a"), owner, Tokens("alice", "kt-owned"))
        a.connect()
        waitFor("owner connected") { owner.last() == ConnectionState.Connected }
        a.shutdown()
        val rec = Recorder()
        val tokens = Tokens("mallory", "kt-owned")
        val b = HeraldClient(config("kt-owned", "kt-owned-b"), rec, tokens)
        b.connect()
        waitFor("terminal error") { rec.errors.isNotEmpty() }
        Thread.sleep(1000)
        val e = rec.errors.single()
        check(e.terminal && e.error is HeraldException.Forbidden) { "$e" }
        check(rec.last() == ConnectionState.Disconnected) { "${rec.states}" }
        check(rec.states.count { it == ConnectionState.Connecting } == 1) { "retried: ${rec.states}" }
        b.shutdown()
    }

    test("token provider failure is a typed terminal error") {
        val rec = Recorder()
        val failing = object : TokenProvider {
            override fun fetchToken(): String = throw HeraldException.TokenProvider("backend unreachable")
        }
        val client = HeraldClient(config("kt-notoken"), rec, failing)
        client.connect()
        waitFor("terminal error", 20_000) { rec.errors.any { it.terminal } }
        val e = rec.errors.last()
        check(e.error is HeraldException.TokenProvider) { "$e" }
        client.shutdown()
    }

    finish()
}
