package dev.herald.sample

import android.content.Context
import java.util.UUID

/** What the stub sign-in asks for. */
data class SignIn(val gatewayUrl: String, val backendUrl: String, val user: String)

/** The sign-in and this installation's device id, in SharedPreferences. */
class SampleSettings(context: Context) {
    private val prefs = context.getSharedPreferences("herald-sample", Context.MODE_PRIVATE)

    /** One id per installation: a device id belongs to the first user that uses it. */
    val deviceId: String
        @Synchronized get() = prefs.getString("device_id", null)
            ?: ("android-" + UUID.randomUUID()).also { prefs.edit().putString("device_id", it).apply() }

    var signIn: SignIn?
        get() {
            val user = prefs.getString("user", null) ?: return null
            return SignIn(prefs.getString("gateway_url", "")!!, prefs.getString("backend_url", "")!!, user)
        }
        set(value) {
            prefs.edit().apply {
                if (value == null) {
                    remove("user")
                } else {
                    putString("gateway_url", value.gatewayUrl)
                    putString("backend_url", value.backendUrl)
                    putString("user", value.user)
                }
            }.apply()
        }
}
