// Plain Kotlin (no Android classes).
package dev.herald.sample.core

import dev.herald.sdk.HeraldException
import dev.herald.sdk.TokenProvider
import java.io.IOException
import java.net.HttpURLConnection
import java.net.URI

/**
 * Gets device JWTs from the sample backend (`sample-backend/token-server.py`,
 * `POST /device-token {"user": ..., "device_id": ...}`), the way a real app asks its own
 * backend. The token is bound to the device id the SDK passes (the configured one, or
 * the one it generated), which the gateway requires as the token's `did`. The app holds
 * no API key. The SDK calls this on a background thread, so blocking is fine.
 */
class SampleBackendTokenProvider(
    private val backendUrl: String,
    private val user: String,
) : TokenProvider {
    override fun fetchToken(deviceId: String): String {
        val url = backendUrl.trimEnd('/') + "/device-token"
        try {
            val c = URI(url).toURL().openConnection() as HttpURLConnection
            c.requestMethod = "POST"
            c.connectTimeout = 10_000
            c.readTimeout = 10_000
            c.doOutput = true
            c.setRequestProperty("Content-Type", "application/json")
            c.outputStream.use { it.write(jsonObjectOf(mapOf("user" to user, "device_id" to deviceId)).toByteArray()) }
            val status = c.responseCode
            val body = (if (status < 400) c.inputStream else c.errorStream)
                ?.bufferedReader()?.use { it.readText() } ?: ""
            if (status != 200) {
                throw HeraldException.TokenProvider("sample backend $url answered $status: $body")
            }
            return stringField(body, "token")
                ?: throw HeraldException.TokenProvider("no token in the answer of $url: $body")
        } catch (e: IOException) {
            throw HeraldException.TokenProvider("sample backend $url unreachable ($e); is token-server.py running?")
        } catch (e: IllegalArgumentException) {
            throw HeraldException.TokenProvider("bad sample backend URL '$backendUrl': ${e.message}")
        }
    }
}
