package dev.herald.sdk

import android.content.Context

/**
 * Android setup of the Herald SDK. Call [init] once, before the first [HeraldClient]
 * connects over TLS — in `Application.onCreate` is simplest:
 *
 * ```kotlin
 * class MyApp : Application() {
 *     override fun onCreate() {
 *         super.onCreate()
 *         HeraldAndroid.init(this)
 *     }
 * }
 * ```
 *
 * It gives the SDK's TLS verifier (rustls-platform-verifier) the app's Context: server
 * certificates are then checked by an Android trust manager over the device's CA store
 * (system, user- and MDM-installed CAs), with the certificate pins of
 * `ClientConfig.pinnedSpkiSha256` on top. Without it, a connect to
 * an `https` gateway fails at once with `HeraldException.InvalidConfig` saying to call
 * this (plain `http` gateways do not need it). Calling it again does nothing.
 */
object HeraldAndroid {
    @Volatile
    private var initialized = false

    @JvmStatic
    @Synchronized
    fun init(context: Context) {
        if (initialized) return
        // The JNI entry point lives in the binding's library; JNA loads it too (the
        // same library, loaded once), but JNI resolves native methods only in
        // libraries loaded through System.loadLibrary.
        System.loadLibrary("herald_ffi")
        nativeInit(context.applicationContext)
        initialized = true
    }

    @JvmStatic
    private external fun nativeInit(context: Context)
}
